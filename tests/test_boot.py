"""`tracker serve` on gunicorn's arbiter, with real faults: PostgreSQL unreachable at start stops it
with the reason and a non-zero status (never a silent respawn), Redis unreachable at start does not
(fail-open), a bad setting is named before anything starts; /metrics sums every worker whatever was
imported first; SIGHUP replaces the workers gracefully with every redirected click stored."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tracker import serve

from .conftest import BROWSER, free_port, serve_env, serve_process
from .waiting import until, until_blocking

HERE = Path(__file__).parent


def start(settings, *args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.Popen[bytes]:
    """`tracker serve ARGS` (or `python -c CODE serve ARGS`) with its stdout and stderr in the data dir."""
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "tracker.cli"]
    with (settings.data_dir / "serve.out").open("wb") as out, (settings.data_dir / "serve.err").open("wb") as err:
        return subprocess.Popen([*command, "serve", *args], env=serve_env(settings, env), stdout=out, stderr=err,
                                start_new_session=True)


def output(settings) -> tuple[str, str]:
    return ((settings.data_dir / "serve.out").read_text(errors="replace"),
            (settings.data_dir / "serve.err").read_text(errors="replace"))


def finish(proc: subprocess.Popen[bytes], seconds: float) -> int:
    try:
        return proc.wait(seconds)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- a bad setting is named and nothing starts ------------------------------------------------------
@pytest.mark.parametrize(("env", "args", "named"), [
    ({"TRACKER_HOST": "not a host"}, (), "TRACKER_HOST"),
    ({"TRACKER_HOST": "exa_mple..com"}, (), "TRACKER_HOST"),
    ({"TRACKER_PORT": "0"}, (), "TRACKER_PORT"),
    ({}, ("--port", "0"), "--port"),
    ({}, ("--host", "bad host"), "--host"),
    ({}, ("--workers", "0"), "--workers"),
    ({"TRACKER_REDIS_PREFIX": "trk prod:"}, (), "TRACKER_REDIS_PREFIX"),
    ({"TRACKER_REDIS_PREFIX": "trk{x}:"}, (), "TRACKER_REDIS_PREFIX"),
    ({"TRACKER_DATABASE_URL": "http://127.0.0.1:5432/x"}, (), "TRACKER_DATABASE_URL"),
    ({"TRACKER_DATABASE_URL": "postgresql://127.0.0.1:5432x/x"}, (), "TRACKER_DATABASE_URL"),
    ({"TRACKER_DATABASE_REPLICA_URL": "mysql://127.0.0.1/x"}, (), "TRACKER_DATABASE_REPLICA_URL"),
    ({"TRACKER_DATABASE_DIRECT_URL": "127.0.0.1:5432"}, (), "TRACKER_DATABASE_DIRECT_URL"),
    ({"TRACKER_REDIS_URL": "127.0.0.1:6379"}, (), "TRACKER_REDIS_URL"),
    ({"TRACKER_REDIS_URL": "redis://127.0.0.1:6379/zero"}, (), "TRACKER_REDIS_URL"),
    ({"TRACKER_REDIS_URL": "redis://127.0.0.1:0/0"}, (), "TRACKER_REDIS_URL"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_setting_is_named_and_stops_the_start(settings, env, args, named):
    proc = start(settings, *args, env=env)
    code = finish(proc, 60)
    out, err = output(settings)
    assert code == 2, err
    assert f"tracker: bad setting: {named}" in err
    assert "gunicorn" not in err and out == ""  # refused before anything started


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_a_data_dir_serve_cannot_write_to_is_named_and_stops_the_start(settings, tmp_path, where):
    """TRACKER_DATA_DIR that is a file, lies under one, or is on a read-only disk (a real read-only
    tmpfs: the tests run as root, so permissions alone prove nothing): named, exit 2, no traceback."""
    (tmp_path / "file").write_text("x")
    data_dir = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "data",
                "read-only": tmp_path / "ro"}[where]
    if where == "read-only":
        data_dir.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(data_dir)], check=True)
    try:
        proc = start(settings, env={"TRACKER_DATA_DIR": str(data_dir)})
        code = finish(proc, 60)
    finally:
        if where == "read-only":
            subprocess.run(["umount", "-l", str(data_dir)], check=False)
    out, err = output(settings)
    assert code == 2, err
    assert f"tracker: bad setting: TRACKER_DATA_DIR={str(data_dir)!r}" in err
    assert "Traceback" not in err and out == ""


def test_a_port_taken_by_another_program_is_named(settings):
    with socket.create_server(("127.0.0.1", 0)) as taken:  # no SO_REUSEPORT: not shareable
        port = taken.getsockname()[1]
        proc = start(settings, "--port", str(port), "--workers", "2")
        code = finish(proc, 60)
    out, err = output(settings)
    assert code == 1, err
    [said] = [json.loads(line) for line in err.splitlines()]  # TRACKER_LOG_FORMAT=json: a JSON line
    assert said["event"] == "cannot_listen" and f"cannot listen on 127.0.0.1:{port}" in said["message"], err


# -- boot failures --------------------------------------------------------------------------------
@pytest.mark.fault
def test_postgresql_unreachable_at_start_stops_serve_with_the_reason(settings):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/tracker"  # nothing listens there
    started = time.monotonic()
    proc = start(settings, "--port", str(free_port()), "--workers", "2", env={"TRACKER_DATABASE_URL": dead})
    code = finish(proc, 90)
    took = time.monotonic() - started
    out, err = output(settings)
    assert code == 3, err  # gunicorn's "worker failed to boot"
    assert took < 90
    reason = f"PostgreSQL at {dead} did not answer in 15 s"
    assert f"could not start: {reason}" in err and "Connection refused" in err
    said = [json.loads(line) for line in err.splitlines()]  # TRACKER_LOG_FORMAT=json: JSON lines on stderr
    assert [line["message"] for line in said if line["event"] == "serve_stopped"] == [
        "serve stopped with exit status 3: a worker could not start (its reason is above)"]
    lines = [json.loads(line) for line in out.splitlines()]  # every line, gunicorn's too
    assert len([line for line in lines if line["event"].startswith("Booting worker")]) == 2  # never started again
    failed = [line for line in lines if line["event"] == "worker_boot_failed"]
    assert failed and all(reason in line["reason"] for line in failed)
    assert any(line["event"] == "postgres_unreachable_at_start" for line in lines)
    assert [line["exit_status"] for line in lines if line["event"] == "serve_stopped"] == [3]
    assert "Task was destroyed" not in out
    assert not serve.metrics_directory(proc.pid).exists()  # the metrics files cleaned up


def test_a_stop_while_the_workers_wait_for_postgresql_is_a_clean_stop(settings):
    """SIGTERM while the workers' apps still wait for PostgreSQL (a deploy rolled back, a pod
    evicted, or a worker started again during an outage): they stop at once and serve exits 0; a
    stop is not a failed boot (which would stop the arbiter with 3)."""
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/tracker"  # nothing listens there
    proc = start(settings, "--port", str(free_port()), "--workers", "2", env={"TRACKER_DATABASE_URL": dead})
    try:
        until_blocking(lambda: len(re.findall(r'"attempt":1,[^\n]*"postgres_unreachable_at_start"', output(settings)[0])) >= 2,
                       "both workers waiting for PostgreSQL")
        proc.send_signal(signal.SIGTERM)
        code = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = output(settings)
    assert code == 0, err
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "worker_boot_failed" not in events and "could not start" not in err
    assert events.count("worker_stopped_while_starting") == 2


@pytest.mark.fault
async def test_redis_unreachable_at_start_serves(settings, tokens, db):
    nothing = f"redis://127.0.0.1:{free_port()}/0"
    async with serve_process(settings, workers=2, env={"TRACKER_REDIS_URL": nothing}) as (proc, base):
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "degraded" and (await resp.json())["redis"] == "down"
            async with session.get(base + "/go/nike", params={"u": tokens.mint("boot-redis")}, headers=BROWSER,
                                   allow_redirects=False) as resp:
                assert resp.status == 302
                click = resp.headers["X-Click-Id"]
        assert await until(lambda: db.fetchval("SELECT count(*) FROM clicks WHERE click_id = $1", click),
                           "the click stored")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0


# -- one log format -------------------------------------------------------------------------------------
def lines_of(text: str, fmt: str) -> list[dict[str, object]]:
    """Each line of a stream as JSON, failing on the first that is not."""
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a line that is not JSON ({fmt}): {line!r}") from None
    return parsed


@pytest.mark.fault
async def test_with_json_logs_every_line_of_serve_is_json_and_names_where_it_listens(settings):
    """gunicorn's own lines (start, listening, workers booting, the stop) go through the project's log:
    with TRACKER_LOG_FORMAT=json nothing on stdout or stderr is plain text."""
    port = free_port()
    proc = start(settings, "--port", str(port), "--workers", "2", env={"TRACKER_LOG_FORMAT": "json"})
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async def ready() -> bool:
                try:
                    async with session.get(base + "/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    assert proc.poll() is None, output(settings)
                    return False
            await until(ready, "tracker serve ready", 60)
            arbiter = psutil.Process(proc.pid)
            await until(lambda: len(arbiter.children()) == 2, "two workers")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = finish(proc, 60)
    out, err = output(settings)
    assert code == 0, err
    logged, said = lines_of(out, "stdout"), lines_of(err, "stderr")
    events = [str(line["event"]) for line in logged + said]
    assert [e for e in events if e.startswith("Listening at: ")] == [f"Listening at: {base} ({proc.pid})"]
    assert [line.get("url") for line in said if line["event"] == "serving"] == [base]
    assert len([e for e in events if e.startswith("Booting worker")]) == 2
    assert any(e.startswith("Starting gunicorn") for e in events) and "Shutting down: Master" in events
    assert all({"event", "level", "timestamp"} <= set(line) for line in logged + said)


# -- metrics whatever the import order ----------------------------------------------------------------
def clicks_per_worker(directory: Path) -> dict[str, float]:
    """tracker_clicks_total as each worker's own file holds it (prometheus_client's multiprocess files)."""
    counts: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        values = MmapedDict(str(path), read_mode=True)
        try:
            counts[path.stem] = sum(v for key, v, _ in values.read_all_values()
                                    if json.loads(key)[1] == "tracker_clicks_total")
        finally:
            values.close()
    return counts


@pytest.mark.fault
async def test_metrics_sum_both_workers_when_prometheus_was_imported_first(settings, tokens):
    """The embedded servers' start imports prometheus_client before `tracker serve` knows it will fork;
    here the process imports it, and tracker's metrics, before anything else."""
    port = free_port()
    first = "import prometheus_client, tracker.metrics, sys; from tracker.cli import main; sys.exit(main())"
    proc = start(settings, "--port", str(port), "--workers", "2", code=first)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async def ready() -> bool:
                try:
                    async with session.get(base + "/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    assert proc.poll() is None, output(settings)[1]
                    return False
            await until(ready, "tracker serve ready", 60)
            directory = serve.metrics_directory(proc.pid)
            assert directory.is_dir()
            token, sent = tokens.mint("boot-metrics"), 0

            async def both_workers_counted() -> bool:  # new connections until the kernel gave each some
                nonlocal sent
                for _ in range(20):
                    async with session.get(base + "/go/nike", params={"u": token}, headers=BROWSER,
                                           allow_redirects=False) as resp:
                        assert resp.status == 302
                        sent += 1
                return len([n for n in clicks_per_worker(directory).values() if n > 0]) == 2
            await until(both_workers_counted, "clicks counted by both workers")

            async def summed() -> bool:
                async with session.get(base + "/metrics") as resp:
                    text = await resp.text()
                return sum(float(v) for v in re.findall(
                    r'tracker_clicks_total\{bot="false",merchant="nike",source="web"\} (\S+)', text)) == sent
            await until(summed, f"/metrics showing all {sent} clicks")
            async with session.get(base + "/metrics") as resp:
                assert "\ntracker_spool_ok 1.0\n" in await resp.text()  # the live minimum: the workers' own
            assert list(directory.glob(f"*_{proc.pid}.db")) == []  # nothing of the arbiter's counts
    finally:
        proc.send_signal(signal.SIGTERM)
        assert finish(proc, 60) == 0, output(settings)[1]


# -- graceful restart --------------------------------------------------------------------------------
@pytest.mark.fault
async def test_sighup_replaces_the_workers_and_loses_no_click(settings, tokens, db):
    async with serve_process(settings, workers=2) as (proc, base):
        arbiter = psutil.Process(proc.pid)

        def workers(old: set[int] = set()) -> set[int] | None:  # noqa: B006 (never changed)
            """The two workers, when there are two and none of them is in `old`."""
            found = {c.pid for c in arbiter.children()}
            return found if len(found) == 2 and not found & old else None

        before = await until(workers, "two workers")
        token = tokens.mint("boot-sighup")
        redirected: list[str | None] = []
        refused: list[str | None] = []

        async def load(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                try:
                    async with session.get(base + "/go/nike", params={"u": token}, headers=BROWSER,
                                           allow_redirects=False) as resp:
                        (redirected if resp.status == 302 else refused).append(resp.headers.get("X-Click-Id"))
                except (aiohttp.ClientError, OSError):
                    pass  # a connection the old worker's closing socket reset: never answered

        stop = asyncio.Event()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            loaders = [asyncio.create_task(load(session)) for _ in range(8)]
            await until(lambda: len(redirected) >= 50, "the load under way")
            proc.send_signal(signal.SIGHUP)
            after = await until(lambda: workers(before), "two new workers in place of the old")
            count = len(redirected)
            await until(lambda: len(redirected) >= count + 50, "new workers answering")
            stop.set()
            await asyncio.gather(*loaders)
        assert proc.poll() is None and after
        assert refused == []
        stored = {r["click_id"] for r in await db.fetch("SELECT click_id FROM clicks WHERE user_id = $1",
                                                        "boot-sighup")}
        assert set(redirected) <= stored
