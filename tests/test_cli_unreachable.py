"""The commands that use PostgreSQL, when it cannot be reached or refuses tracker: one line on stderr
naming the server (password hidden) and the error, exit status 1, never a traceback."""
from __future__ import annotations

from pathlib import Path

import pytest

from tracker.settings import Settings

from .conftest import cli, free_port

COMMANDS = (("migrate",), ("maintain",), ("keys", "list"), ("keys", "create", "k1", "--scope", "events:read"),
            ("keys", "revoke", "k1"), ("postbacks", "orphans"), ("postbacks", "reconcile"), ("webhooks", "status"),
            ("webhooks", "retry", "ledger"), ("users", "erase", "someone"))


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_postgresql_unreachable_is_named_without_a_traceback(settings: Settings, command: tuple[str, ...]):
    closed = f"postgresql://tracker:s3cret-pass@127.0.0.1:{free_port()}/tracker"  # nothing listens there
    out = cli(settings, *command, TRACKER_DATABASE_URL=closed, TRACKER_DATABASE_DIRECT_URL=closed)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert "PostgreSQL at postgresql://tracker:***@127.0.0.1" in out.stderr and "s3cret-pass" not in out.stderr


def test_a_database_that_does_not_exist_is_named(settings: Settings, tmp_path: Path):
    assert settings.database_url is not None
    missing = settings.database_url.rsplit("/", 1)[0] + "/no_such_database_here"
    merchants = Path(__file__).parent / "merchants.yaml"
    for command in (("keys", "list"), ("merchants", "sync", str(merchants))):
        out = cli(settings, *command, TRACKER_DATABASE_URL=missing)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and "no_such_database_here" in out.stderr
