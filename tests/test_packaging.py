"""The package stands on its own: the migrations ship inside it (tracker/sql, package data), a wheel
installed outside this checkout migrates a fresh database, and finding no migrations is an error."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tracker.store.db import MigrationsError, migrations

from .conftest import _admin, cli, with_database

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_SQL = ROOT / "tracker" / "sql"
SHIPPED_SUFFIXES = {".py", ".sql", ".yaml", ".html", ".css", ".js", ".json", ".svg", ".png"}


def test_the_repository_sql_is_the_package_sql():
    # sql/ stays where scripts and habits look for it, as a link to the migrations the package ships.
    assert (ROOT / "sql").is_symlink() and (ROOT / "sql").resolve() == PACKAGE_SQL.resolve()
    names = [name for _, name, _ in migrations()]
    assert names == sorted(p.name for p in PACKAGE_SQL.glob("*.sql"))
    assert names[0] == "0001_init.sql"


def test_no_migrations_is_an_error(tmp_path):
    with pytest.raises(MigrationsError, match="no migrations"):
        migrations(tmp_path)
    with pytest.raises(MigrationsError, match="no migrations"):
        migrations(tmp_path / "missing")
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationsError, match="duplicate"):
        migrations(tmp_path)


def test_tracker_sql_dir_overrides_the_packaged_migrations(tmp_path, monkeypatch):
    shutil.copy(PACKAGE_SQL / "0001_init.sql", tmp_path)
    monkeypatch.setenv("TRACKER_SQL_DIR", str(tmp_path))
    assert [name for _, name, _ in migrations()] == ["0001_init.sql"]


def test_migrate_without_migrations_fails_and_says_why(settings, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(settings, "migrate", TRACKER_SQL_DIR=str(empty))
    assert result.returncode == 1, result.stderr
    assert f"no migrations (NNNN_name.sql) found in {empty}" in result.stderr
    assert result.stdout == ""  # no {"applied": []} that reads as success


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_applies_every_migration(servers, tmp_path):
    """What the image does: a wheel of pyproject.toml, README.md and tracker/ (the Dockerfile's build
    stage copies exactly these), installed into a virtualenv outside the checkout, run from
    elsewhere. The virtualenv borrows this one's installed dependencies (a plain path line in a .pth
    file: the editable install of the checkout living there stays inert) so no network is needed."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "tracker", src / "tracker", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path / "wheels"), str(src)],
                   check=True, capture_output=True, timeout=120)
    [wheel] = (tmp_path / "wheels").glob("tracker-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    # Every file the code reads at run time ships: modules, migrations, data, the console's templates.
    package = {f"tracker/{p.relative_to(src / 'tracker').as_posix()}" for p in (src / "tracker").rglob("*")
               if p.suffix in SHIPPED_SUFFIXES}
    assert sorted(package - shipped) == []
    assert {n for n in shipped if n.startswith("tracker/sql/")} == {f"tracker/sql/{p.name}" for p in PACKAGE_SQL.glob("*.sql")}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, timeout=120)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKER_", "PYTHON"))}
    located = subprocess.run([python, "-c", "import tracker; print(tracker.__file__)"], cwd=elsewhere, env=env,
                             check=True, capture_output=True, text=True).stdout.strip()
    assert Path(located).is_relative_to(venv), located  # the wheel's code, not the checkout's

    name = f"trk_test_wheel_{secrets.token_hex(4)}"
    asyncio.run(_admin(servers[0], f"CREATE DATABASE {name}"))
    try:
        result = subprocess.run(
            [venv / "bin" / "tracker", "migrate"], cwd=elsewhere, capture_output=True, text=True, timeout=60,
            env={**env, "TRACKER_DATABASE_URL": with_database(servers[0], name), "TRACKER_REDIS_URL": servers[1],
                 "TRACKER_DATA_DIR": str(tmp_path / "data"), "TRACKER_SECRET": "wheel-secret-0123456789"})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["applied"] == sorted(p.name for p in PACKAGE_SQL.glob("*.sql"))
    finally:
        asyncio.run(_admin(servers[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
