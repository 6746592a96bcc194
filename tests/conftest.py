"""Real PostgreSQL and Redis for every test: the variables' servers when set (make test sets them),
else the embedded ones. Each test module gets a fresh, migrated database and its own Redis key
prefix, both removed afterwards."""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, AsyncIterator, Generator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import hypothesis
import psutil
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.cluster import RedisCluster as SyncRedisCluster

from tracker import keys
from tracker.app import create_app
from tracker.domain.merchants import parse_merchants_file
from tracker.domain.profiles import profile_names
from tracker.domain.tokens import UserTokens
from tracker.settings import Settings
from tracker.store.db import connect, migrate
from tracker.store.merchants import sync

from .stack import PgBouncer, RedisClusterNodes
from .waiting import answers_blocking, until

HERE = Path(__file__).parent
SECRET = "test-secret-0123456789abcdef"
ADMIN_KEY = "test-admin-key-0123456789abcdefghij"

# `make test` fuzzes derandomized: the same examples on every run, so that a failure shows again
# on the next run and a pass is not luck. `make fuzz` (--hypothesis-profile=fuzz) draws new ones and
# keeps every failing example in .hypothesis/, to be replayed first next time.
hypothesis.settings.register_profile("derandomized", derandomize=True, database=None)
hypothesis.settings.register_profile("fuzz", derandomize=False)
hypothesis.settings.load_profile("derandomized")


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    db, rd = os.environ.get("TRACKER_DATABASE_URL"), os.environ.get("TRACKER_REDIS_URL")
    if db and rd:
        return db, rd
    from tracker import embedded

    found = embedded.start(Path(os.environ.get("TRACKER_DATA_DIR", HERE.parent / ".data")).absolute())
    return db or found.database_url, rd or found.redis_url


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def load_merchants(path: Path = HERE / "merchants.yaml"):  # noqa: ANN201
    return parse_merchants_file(yaml.safe_load(path.read_text()), profile_names())


async def prepare_database(dsn: str) -> None:
    """Migrate an empty database and sync the test merchants file into it."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await sync(conn, load_merchants())
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pooler(request: pytest.FixtureRequest) -> str | None:
    """None, or `transaction` for the second run of a `pooled` module (pytest_generate_tests)."""
    return getattr(request, "param", None)


@pytest.fixture(scope="module")
def redis_mode(request: pytest.FixtureRequest) -> str | None:
    """None, or `cluster` for the second run of a `clustered` module (pytest_generate_tests)."""
    return getattr(request, "param", None)


@pytest.fixture(scope="module")
def database(servers: tuple[str, str], pooler: str | None, redis_mode: str | None) -> Iterator[str]:
    """A fresh database per module (and per run of a `pooled` or `clustered` one)."""
    name = f"trk_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(servers[0], f"CREATE DATABASE {name}"))
    dsn = with_database(servers[0], name)
    asyncio.run(prepare_database(dsn))
    yield dsn
    asyncio.run(_admin(servers[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def redis_prefix(servers: tuple[str, str], pooler: str | None, redis_mode: str | None,
                 request: pytest.FixtureRequest) -> Iterator[str]:
    prefix = f"trktest:{secrets.token_hex(4)}:"
    yield prefix
    if redis_mode == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        for port in cluster.masters():  # each master's own keys
            _delete_prefixed(redis.Redis(port=port), prefix)
    else:
        _delete_prefixed(redis.Redis.from_url(servers[1]), prefix)


def _delete_prefixed(client: redis.Redis, prefix: str) -> None:
    try:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
    except redis.ConnectionError:
        pass  # a node a fault test killed
    finally:
        client.close()


_CLUSTER_URLS: set[str] = set()  # the seed URLs of the clusters this test run started


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    """A Redis Cluster of Debian's redis-server, 3 masters and 3 replicas (tests/stack.py), ~2 s to start."""
    cluster = RedisClusterNodes([free_port(bus=True) for _ in range(6)])
    try:
        cluster.start()
        _CLUSTER_URLS.add(cluster.url())
        yield cluster
    finally:
        cluster.close()


def redis_client(settings: Settings) -> aioredis.Redis | RedisCluster:
    """An asyncio client of the test's Redis: a RedisCluster when it is the suite's cluster."""
    url = settings.redis_url or ""
    if url in _CLUSTER_URLS:
        return RedisCluster.from_url(url)
    return aioredis.Redis.from_url(url)


async def subscribers(client: aioredis.Redis | RedisCluster, *channels: str) -> list[int]:
    """How many connections listen on each channel: PUBSUB NUMSUB, or on a cluster PUBSUB SHARDNUMSUB
    asked of the master of each channel's slot (the feed SSUBSCRIBEs there)."""
    if not isinstance(client, RedisCluster):
        return [int(n) for _, n in await client.pubsub_numsub(*channels)]
    await client.initialize()  # the slots, once
    counts = []
    for channel in channels:
        node = client.get_node_from_key(channel)
        reply = await client.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
        counts.append(int(reply[0][1]) if isinstance(reply, list) and isinstance(reply[0], (list, tuple))
                      else int(reply[1]))
    return counts


def sync_redis_client(url: str) -> redis.Redis | SyncRedisCluster:
    """redis_client, blocking."""
    return SyncRedisCluster.from_url(url) if url in _CLUSTER_URLS else redis.Redis.from_url(url)


@pytest.fixture(scope="session")
def pgbouncer(servers: tuple[str, str]) -> Iterator[PgBouncer]:
    """Debian's PgBouncer in transaction pooling mode in front of the suite's PostgreSQL (tests/stack.py)."""
    bouncer = PgBouncer(servers[0])
    bouncer.start()
    yield bouncer
    bouncer.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `pooled` runs each test that uses `settings` twice: on PostgreSQL directly,
    and behind PgBouncer in transaction mode (TRACKER_DATABASE_POOLER=transaction). One marked
    `clustered` runs it on a standalone Redis and on a Redis Cluster (the `redis_cluster` fixture).
    One marked both runs it twice too: directly on a standalone Redis, and behind PgBouncer on the
    cluster (the whole stack), not four times. `clustered(only=True)` runs it on the cluster alone."""
    pooled = "pooler" in metafunc.fixturenames and metafunc.definition.get_closest_marker("pooled")
    clustered = "redis_mode" in metafunc.fixturenames and metafunc.definition.get_closest_marker("clustered")
    if pooled and clustered:
        metafunc.parametrize(["pooler", "redis_mode"], [(None, None), ("transaction", "cluster")],
                             ids=["direct", "pgbouncer-cluster"], indirect=True, scope="module")
    elif pooled:
        metafunc.parametrize("pooler", [None, "transaction"], ids=["direct", "pgbouncer"], indirect=True,
                             scope="module")
    elif clustered and clustered.kwargs.get("only"):  # `clustered(only=True)`: on the cluster alone
        metafunc.parametrize("redis_mode", ["cluster"], ids=["cluster"], indirect=True, scope="module")
    elif clustered:
        metafunc.parametrize("redis_mode", [None, "cluster"], ids=["standalone", "cluster"], indirect=True,
                             scope="module")


@pytest.fixture
def settings(servers: tuple[str, str], database: str, redis_prefix: str, tmp_path: Path, pooler: str | None,
             redis_mode: str | None, request: pytest.FixtureRequest) -> Settings:
    through: dict[str, str | None] = {"database_url": database}
    if pooler:
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        through = {"database_url": bouncer.url(urlsplit(database).path.lstrip("/")), "database_pooler": pooler,
                   "database_direct_url": database}
    redis_url = request.getfixturevalue("redis_cluster").url() if redis_mode == "cluster" else servers[1]
    return Settings(redis_url=redis_url, data_dir=tmp_path, secret=SECRET, admin_key=ADMIN_KEY,
                    redis_prefix=redis_prefix, workers=1, rate_limit_user=0, rate_limit_ip=0,
                    rate_limit_delay_ms=0, **through)  # type: ignore[arg-type]


def database_env(settings: Settings) -> dict[str, str]:
    """The TRACKER_DATABASE_* variables of `settings`."""
    return {name: value for name, value in (
        ("TRACKER_DATABASE_URL", settings.database_url), ("TRACKER_DATABASE_POOLER", settings.database_pooler),
        ("TRACKER_DATABASE_DIRECT_URL", settings.database_direct_url),
        ("TRACKER_DATABASE_REPLICA_URL", settings.database_replica_url)) if value}


@pytest.fixture
def tokens() -> UserTokens:
    return UserTokens(SECRET)


@pytest.fixture
async def client(aiohttp_client, settings: Settings):  # noqa: ANN001, ANN201
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(database)  # as tracker's own: json and jsonb read as Python values
    yield conn
    await conn.close()


BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Temporary directories of this run's own, not under the shared /tmp/pytest-of-<user>: every
    pytest that starts on the machine chmods that one back to 0700 and prunes its older runs, which
    took the embedded PostgreSQL's data (owned by another user) away from it mid-run."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="tracker-tests-")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that passed leaves nothing behind; a failed one keeps its servers' logs to read. The
    ports' locks are let go now that every server of the run has stopped."""
    for lock in _held_ports:
        lock.close()
    _held_ports.clear()
    basetemp = session.config.option.basetemp
    if exitstatus == 0 and basetemp and Path(basetemp).name.startswith("tracker-tests-"):
        shutil.rmtree(basetemp, ignore_errors=True)


_PORT_LOCKS = Path("/tmp/tracker-test-ports")
_held_ports: list[IO[str]] = []  # the lock files of this test run's ports, open until it ends


def free_port(bus: bool = False) -> int:
    """A loopback port for a server of a test, that nothing else takes before the server binds it.
    Not from bind(("127.0.0.1", 0)): that draws from the kernel's ephemeral range, which every
    outgoing connection on the machine (and every other test run's bind 0) draws from too, so the
    port could be taken between the check and the server's bind. Below that range instead, free
    now, and locked (flock) against other test runs on this machine until this test run ends. With
    `bus`, port + 10000 is free and locked too (a Redis Cluster node's bus), both below the range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    _PORT_LOCKS.mkdir(exist_ok=True)
    pick = random.Random()
    for _ in range(1000):
        port = pick.randrange(10000, low - 10000) if bus else pick.randrange(20000, low)
        locks = []
        try:
            for each in (port, port + 10000) if bus else (port,):
                lock = (_PORT_LOCKS / str(each)).open("a")
                locks.append(lock)
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                    sock.bind(("127.0.0.1", each))
        except OSError:  # another run's port, or in use
            for lock in locks:
                lock.close()
            continue
        _held_ports.extend(locks)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def one_minute(*apps: web.Application) -> None:
    """The apps' rate limits count within one minute for the rest of the test: per-minute counts
    that a minute's end reset halfway would make a test pass or fail by the wall clock."""
    now = time.time()
    for app in apps:
        app[keys.SESSIONS].limits.clock = lambda: now


def cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`tracker ARGS` against the test database, with only the variables it needs (and `env`)."""
    full_env = {"PATH": "/usr/bin:/bin", **database_env(settings),
                "TRACKER_REDIS_URL": settings.redis_url or "", "TRACKER_DATA_DIR": str(settings.data_dir),
                "TRACKER_SECRET": "cli-secret-0123456789", **env}
    return subprocess.run([sys.executable, "-m", "tracker.cli", *args], env=full_env, capture_output=True,
                          text=True, timeout=60)


def serve_env(settings: Settings, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `tracker serve` against the test database and Redis prefix, no rate limits."""
    return {**os.environ, **database_env(settings),
            "TRACKER_REDIS_URL": settings.redis_url or "", "TRACKER_DATA_DIR": str(settings.data_dir),
            "TRACKER_SECRET": SECRET, "TRACKER_ADMIN_KEY": "k" * 32,
            "TRACKER_REDIS_PREFIX": settings.redis_prefix, "TRACKER_RATE_LIMIT_IP": "0",
            "TRACKER_RATE_LIMIT_USER": "0", **(env or {})}


@contextlib.contextmanager
def served(settings: Settings, workers: int = 1, env: dict[str, str] | None = None,
           output: Path | None = None, port: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The real `tracker serve` in a subprocess against the test database, ready (/readyz answers 200)
    when this yields (process, base URL), else an error: never a server that did not start. Killed
    afterwards. Its stdout and stderr go to `output` when given. Tests that use it are marked
    `fault` (pyproject.toml): they take seconds. `port`: one the test drew with free_port() already
    (to tell another server where this one will be)."""
    port = port or free_port()
    log_path = output or settings.data_dir / "serve.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(port),
                             "--workers", str(workers)], env=serve_env(settings, env),
                            stdout=log if output else subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        answers_blocking(base + "/readyz", proc, log_path)
        yield proc, base
    finally:
        if proc.poll() is None:
            # Its workers too: they stop when the arbiter dies (PR_SET_PDEATHSIG), but a worker that
            # failed to would outlive this test run.
            with contextlib.suppress(psutil.Error):
                for worker in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        worker.kill()
            proc.kill()
            proc.wait()
        log.close()


@contextlib.asynccontextmanager
async def serve_process(settings: Settings, workers: int = 1, env: dict[str, str] | None = None,
                        output: Path | None = None) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    """`served` for async tests (its start-up wait blocks the loop briefly; nothing else runs)."""
    with served(settings, workers, env, output) as running:
        yield running


async def redis_value(client, key: str) -> bytes:  # noqa: ANN001
    """A Redis key's value once the service's batched writes have put it there."""
    return await until(lambda: client.get(key), f"Redis key {key} written")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Each phase's report on the test item (item.rep_setup, rep_call, rep_teardown), so that a
    fixture's teardown can tell whether its test failed (and then print what helps explain why)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
