"""docs/configuration.md and the settings object cannot drift apart: the page names exactly the
variables `settings.load()` reads (plus those read elsewhere in the package, in their own section),
and every default it writes as `code` is the value the settings take when the variable is unset."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracker import settings as settings_module

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
ELSEWHERE = "## Outside the settings object"
ROW = re.compile(r"^\| `(TRACKER_[A-Z0-9_]+)` \| ([^|]*) \|", re.M)
LITERAL = re.compile(r"`([^`]*)`")


class Reads(dict[str, str]):
    """An environment that notes every variable asked for."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)


def documented() -> tuple[dict[str, str], dict[str, str]]:
    """(settings rows, rows read elsewhere): variable -> default cell."""
    text = DOC.read_text()
    settings_part, _, elsewhere_part = text.partition(ELSEWHERE)
    assert elsewhere_part, f"{DOC} lost its section {ELSEWHERE!r}"
    rows = {name: cell.strip() for name, cell in ROW.findall(settings_part)}
    other = {name: cell.strip() for name, cell in ROW.findall(elsewhere_part)}
    assert len(rows) == len(ROW.findall(settings_part)), "a variable is documented twice"
    return rows, other


# Secrets given so that load() generates no development keys; everything else unset.
BASE = {"TRACKER_SECRET": "s" * 32, "TRACKER_ADMIN_KEY": "a" * 32}


def test_the_page_names_exactly_the_variables_the_settings_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = Reads(BASE)
    settings_module.load(env)
    rows, _ = documented()
    assert sorted(set(rows) - env.asked) == [], "documented but never read by settings.load()"
    assert sorted(env.asked - set(rows)) == [], "read by settings.load() but missing from docs/configuration.md"


def test_every_tracker_variable_in_the_package_is_documented():
    rows, other = documented()
    in_code = set()
    for path in (ROOT / "tracker").rglob("*.py"):
        in_code |= set(re.findall(r"\bTRACKER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    assert sorted(in_code - set(rows) - set(other)) == []
    assert sorted(set(other) - in_code) == [], "documented as read elsewhere, but no code reads it"


@pytest.mark.parametrize("name", [n for n, cell in documented()[0].items() if LITERAL.fullmatch(cell)])
def test_each_written_default_is_the_settings_default(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # TRACKER_DATA_DIR's default is relative to the working directory
    default = LITERAL.fullmatch(documented()[0][name])[1]  # type: ignore[index]
    unset = settings_module.load(dict(BASE))
    assert settings_module.load({**BASE, name: default}) == unset, \
        f"{name}={default!r} (the documented default) gives other settings than leaving it unset"


def test_defaults_not_written_as_code_are_the_few_that_are_not_constants():
    rows, _ = documented()
    prose = {name for name, cell in rows.items() if not LITERAL.fullmatch(cell)}
    # Servers that default to the embedded ones, keys generated for development, a count of CPUs,
    # and values that are simply absent unless given.
    assert prose == {"TRACKER_DATABASE_URL", "TRACKER_REDIS_URL", "TRACKER_WORKERS", "TRACKER_SECRET",
                     "TRACKER_ADMIN_KEY", "TRACKER_SECRET_PREVIOUS", "TRACKER_SECRET_PREVIOUS_UNTIL",
                     "TRACKER_TRUSTED_PROXIES", "TRACKER_MERCHANTS", "TRACKER_PUBLIC_URL",
                     "TRACKER_CORS_ORIGINS", "TRACKER_DATABASE_POOLER", "TRACKER_DATABASE_DIRECT_URL",
                     "TRACKER_DATABASE_REPLICA_URL", "TRACKER_OIDC_ISSUER", "TRACKER_OIDC_CLIENT_ID",
                     "TRACKER_OIDC_CLIENT_SECRET"}


@pytest.mark.parametrize("env,url", [
    ({}, "http://127.0.0.1:8080"),
    ({"TRACKER_HOST": "0.0.0.0", "TRACKER_PORT": "9000"}, "http://0.0.0.0:9000"),
    ({"TRACKER_HOST": "::1"}, "http://[::1]:8080"),
    ({"TRACKER_PUBLIC_URL": "https://t.example.com/"}, "https://t.example.com"),
    ({"TRACKER_PUBLIC_URL": "https://t.example.com/tracker"}, "https://t.example.com/tracker"),
])
def test_the_public_url_and_its_default(env, url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings_module.load({**BASE, **env}).public_url == url


@pytest.mark.parametrize("bad", ["t.example.com", "ftp://t.example.com", "https://", "https://u:p@t.example.com",
                                 "javascript:alert(1)", "https://t.example.com/?a=1"])
def test_a_public_url_that_is_not_one_is_refused_at_start(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(settings_module.SettingsError, match="TRACKER_PUBLIC_URL"):
        settings_module.load({**BASE, "TRACKER_PUBLIC_URL": bad})


@pytest.mark.parametrize("bad", ["trk{a}:", "{trk}:", "trk}"])
def test_a_redis_prefix_with_a_brace_is_refused_at_start(bad, tmp_path, monkeypatch):
    """A hash tag in the prefix would put every key in one Redis Cluster slot (store/redis_keys.py)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(settings_module.SettingsError, match="TRACKER_REDIS_PREFIX"):
        settings_module.load({**BASE, "TRACKER_REDIS_PREFIX": bad})
