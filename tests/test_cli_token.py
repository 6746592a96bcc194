"""`tracker token USER_ID` with TRACKER_SECRET unset signs with the development secret generated into
the data dir: it says so on stderr (a token production would refuse is never handed out silently)."""
from __future__ import annotations

from tracker.domain.tokens import UserTokens
from tracker.settings import Settings

from .conftest import cli


def test_a_token_signed_with_the_development_secret_comes_with_a_warning(settings: Settings):
    out = cli(settings, "token", "dev-user", TRACKER_SECRET="")
    assert out.returncode == 0, out.stderr
    assert "TRACKER_SECRET is not set" in out.stderr and str(settings.data_dir / "secret") in out.stderr
    dev_secret = (settings.data_dir / "secret").read_text().strip()
    assert UserTokens(dev_secret).verify(out.stdout.strip()) == "dev-user"
    configured = cli(settings, "token", "dev-user")
    assert configured.returncode == 0 and configured.stderr == ""
