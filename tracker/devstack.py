"""What `make run` and `make test` do after installing: servers, migrations, demo data, then serve
or test. `python -m tracker.devstack run|test|stop`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from . import embedded
from .settings import load_or_exit

ROOT = Path(__file__).resolve().parents[1]
TRACKER = [sys.executable, "-m", "tracker.cli"]


def _servers(env: dict[str, str]) -> bool:
    """Point env at the variables' servers, or at embedded ones (started if needed). True when
    embedded servers are in use."""
    if env.get("TRACKER_DATABASE_URL") and env.get("TRACKER_REDIS_URL"):
        return False
    data_dir = Path(env.get("TRACKER_DATA_DIR") or ROOT / ".data").absolute()
    try:
        servers = embedded.start(data_dir)
    except embedded.EmbeddedMissing as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    env.setdefault("TRACKER_DATABASE_URL", servers.database_url)
    env.setdefault("TRACKER_REDIS_URL", servers.redis_url)
    print(f"devstack: embedded PostgreSQL {servers.database_url} and Redis {servers.redis_url} "
          f"under {data_dir / 'embedded'}", file=sys.stderr)
    return True


def _users_dir(env: dict[str, str]) -> Path:
    return Path(env["TRACKER_DATA_DIR"]).absolute() / "embedded" / "users"


def _join(env: dict[str, str]) -> None:
    """Note this process as a user of the embedded servers (several `make test` runs may share them)."""
    users = _users_dir(env)
    users.mkdir(parents=True, exist_ok=True)
    (users / str(os.getpid())).touch()


def _leave_and_stop(env: dict[str, str]) -> None:
    """Stop the embedded servers unless another live process still uses them."""
    users = _users_dir(env)
    (users / str(os.getpid())).unlink(missing_ok=True)
    for entry in users.glob("*"):
        try:
            os.kill(int(entry.name), 0)
        except (ValueError, ProcessLookupError):
            entry.unlink(missing_ok=True)  # a run that died without cleaning up
        except PermissionError:
            return  # alive, another user's
        else:
            return  # alive: it stops them when it is done
    embedded.stop(Path(env["TRACKER_DATA_DIR"]))


def _interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt


def run() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `make run` stopped by SIGTERM cleans up like Ctrl-C
    env = dict(os.environ)
    env.setdefault("TRACKER_DATA_DIR", str(ROOT / ".data"))
    env.setdefault("TRACKER_LOG_FORMAT", "console")
    started = _servers(env)
    if started:
        _join(env)
    try:
        subprocess.run([*TRACKER, "migrate"], env=env, check=True)
        subprocess.run([*TRACKER, "merchants", "sync", str(ROOT / "deploy/merchants.example.yaml")],
                       env=env, check=True)
        os.environ.update(env)
        settings = load_or_exit()
        token = subprocess.run([*TRACKER, "token", "demo-user"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        base = settings.public_url
        print("\n  tracker is starting. Open an activation link for the demo user:\n"
              f"    {base}/go/aliexpress?u={token}&to=https://aliexpress.ru/item/1005001.html\n"
              f"  Admin key (support API, Authorization: Bearer …): {settings.admin_key}\n"
              f"    curl -H 'Authorization: Bearer {settings.admin_key}' {base}/v1/clicks/<X-Click-Id>\n"
              f"  Support console: {base}/support/ (sign in with the admin key)\n"
              f"  Metrics: {base}/metrics   Ready: {base}/readyz\n", flush=True)
        proc = subprocess.Popen([*TRACKER, "serve"], env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if started:
            _leave_and_stop(env)


CHROMIUM = Path("/usr/bin/chromium")
PGBOUNCER = Path("/usr/sbin/pgbouncer")
REDIS_SERVER = Path("/usr/bin/redis-server")
SCREENSHOTS = "screenshots"  # under TRACKER_DATA_DIR: the console's pages as the browser tests saw them


def _apt_install(package: str, what: str, present: Callable[[], bool], tests: str) -> None:
    """Install a Debian package that some tests need, where we can (root and apt-get), and say so on
    the output; say too when those tests will be skipped for want of it."""
    if present():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"devstack: {what} is not installed and cannot be here (that needs root and apt-get); {tests} will be skipped",
              file=sys.stderr)
        return
    print(f"devstack: installing {what} (apt-get install {package}) for {tests}", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    installed = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                               check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if installed.returncode != 0 or not present():
        print(f"devstack: {what} could not be installed; {tests} will be skipped", file=sys.stderr)


def _npm_ci(folder: Path) -> None:
    """The folder's node_modules as its package-lock.json pins them, when they are not there yet."""
    lock = folder / "package-lock.json"
    stamp = folder / "node_modules" / ".package-lock.json"  # npm's own record of what it installed
    if not shutil.which("npm") or (stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime):
        return
    print(f"devstack: npm ci in {folder.relative_to(ROOT)}", file=sys.stderr)
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder, check=False,
                   stdout=subprocess.DEVNULL)


def test(pytest_args: list[str]) -> int:
    # promtool (Debian's `prometheus`) checks the alert rules; the browser tests drive Debian's
    # chromium through Playwright, never a browser build that `playwright install` would download.
    _apt_install("prometheus", "promtool", lambda: shutil.which("promtool") is not None, "the rules tests")
    _apt_install("chromium", "chromium", CHROMIUM.exists, "the browser tests")
    # The pooled runs of the core suites and the pooler's fault tests start Debian's PgBouncer
    # (tests/stack.py); without it they fail, they are not skipped.
    _apt_install("pgbouncer", "PgBouncer", PGBOUNCER.exists, "the tests behind PgBouncer")
    # The console's OpenID sign-in is tested against the `oidc-provider` package run by Debian's node,
    # pinned in tests/oidc/package-lock.json (npm ci installs exactly that).
    _apt_install("nodejs", "node", lambda: shutil.which("node") is not None, "the OpenID sign-in tests")
    _apt_install("npm", "npm", lambda: shutil.which("npm") is not None, "the OpenID sign-in tests")
    _npm_ci(ROOT / "tests" / "oidc")
    # The clustered runs and the cluster's fault test start a Redis Cluster of Debian's redis-server
    # and redis-cli (tests/stack.py); the embedded Redis stays the suite's standalone one.
    _apt_install("redis-server", "redis-server", lambda: REDIS_SERVER.exists() and shutil.which("redis-cli") is not None,
                 "the tests on a Redis Cluster")
    env = dict(os.environ)
    env.setdefault("TRACKER_DATA_DIR", str(ROOT / ".data"))
    started = _servers(env)
    if started:
        _join(env)
    try:
        rc = subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=ROOT).returncode
        shots = Path(env["TRACKER_DATA_DIR"]).absolute() / SCREENSHOTS
        if any(shots.glob("*.png")):
            print(f"devstack: screenshots of the support console's pages: {shots}", file=sys.stderr)
    finally:
        if started:
            _leave_and_stop(env)
    return rc


def main() -> int:
    action = sys.argv[1] if len(sys.argv) > 1 else "run"
    if action == "run":
        return run()
    if action == "test":
        return test(sys.argv[2:])
    if action == "stop":
        embedded.stop(Path(os.environ.get("TRACKER_DATA_DIR") or ROOT / ".data").absolute())
        return 0
    print("usage: python -m tracker.devstack run|test [pytest args]|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
