"""Benchmark driver: starts the servers it needs, runs wrk against each scenario, checks that every
counted 302 has its row, prints a Markdown table. Run through benchmarks/run."""
from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import cpu  # noqa: E402

from tracker.devstack import _servers  # noqa: E402
from tracker.domain.tokens import UserTokens  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "1"))
SECRET = "bench-secret-0123456789abcdef"
BENCH_DB = "trk_bench"
OUT = ROOT / "benchmarks" / "results"
TRACKER = [sys.executable, "-m", "tracker.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str = "/healthz", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if s.recv(64).startswith(b"HTTP/1.1"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}")


def wrk(port: int, script: str, env: dict[str, str], seconds: int = SECONDS,
        connections: int = CONNECTIONS) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2" if connections > 1 else "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
         f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True,
        env={**os.environ, "BENCH_LUA_DIR": str(ROOT / "benchmarks"), **env})
    match = re.search(r"^JSON (.*)$", out.stdout, re.M)
    if not match:
        raise RuntimeError(out.stdout + out.stderr)
    result = json.loads(match.group(1))
    result["rps"] = result["requests"] / result["seconds"]
    return result


def metered_wrk(meter: cpu.Meter, port: int, script: str, env: dict[str, str], **kwargs: int) -> dict[str, float]:
    """wrk, with the CPU the meter's processes spent meanwhile: `cpu_<group>` in us per request, and
    `cpu_us`, their sum."""
    before = meter.snapshot()
    result = wrk(port, script, env, **kwargs)
    spent = meter.spent(before)
    for group, seconds in spent.items():
        result[f"cpu_{group}"] = seconds / result["requests"] * 1e6
    result["cpu_us"] = sum(spent.values()) / result["requests"] * 1e6
    return result


def cpu_cell(result: dict[str, float]) -> str:
    parts = [f"{result[f'cpu_{g}']:.1f}" for g in ("server", "postgres", "redis") if f"cpu_{g}" in result]
    return f"{result['cpu_us']:.1f}" + (f" ({' + '.join(parts)})" if len(parts) > 1 else "")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def prepare_db(admin_url: str) -> str:
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    await conn.execute(f"CREATE DATABASE {BENCH_DB}")
    await conn.close()
    return re.sub(r"/[^/]*$", f"/{BENCH_DB}", admin_url)


async def count_clicks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM clicks")
    finally:
        await conn.close()


async def make_clicks(port: int, signer: UserTokens, n: int) -> str:
    import aiohttp

    lines = []
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            token = signer.mint(f"obs-{i}")
            async with session.get(f"http://127.0.0.1:{port}/go/aliexpress", params={"u": token, "device": "bench-device"},
                                   allow_redirects=False, headers={"User-Agent": "Mozilla/5.0 bench"}) as r:
                lines.append(f"{token} {r.headers['X-Click-Id']}")
    return "\n".join(lines) + "\n"


def setup(data_dir: Path) -> tuple[dict[str, str], Path, bool]:
    """The servers (the variables' or the embedded ones), a fresh benchmark database, migrated and
    with the example merchants, the benchmark's own Redis database (15), and 5,000 user tokens.
    Returns tracker's environment, the tokens file and whether the servers are the embedded ones."""
    env = dict(os.environ)
    env.setdefault("TRACKER_DATA_DIR", str(ROOT / ".data"))
    embedded_servers = _servers(env)
    dsn = asyncio.run(prepare_db(env["TRACKER_DATABASE_URL"]))
    data_dir.mkdir(parents=True, exist_ok=True)
    tenv = {**env, "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET": SECRET, "TRACKER_LOG_FORMAT": "json",
            "TRACKER_RATE_LIMIT_IP": "1000000000", "TRACKER_RATE_LIMIT_USER": "100000",
            "TRACKER_REDIS_PREFIX": "trkbench:", "TRACKER_DATA_DIR": str(data_dir / "data"),
            # Its own Redis database, emptied before each run so that its sessions can be counted.
            "TRACKER_REDIS_URL": re.sub(r"(/\d*)?$", "/15", env["TRACKER_REDIS_URL"].split("?")[0], count=1)}
    subprocess.run([*TRACKER, "migrate"], env=tenv, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*TRACKER, "merchants", "sync", str(ROOT / "deploy/merchants.example.yaml")],
                   env=tenv, check=True, stdout=subprocess.DEVNULL)
    tokens_file = data_dir / "tokens.txt"
    signer = UserTokens(SECRET)
    tokens_file.write_text("\n".join(signer.mint(f"bench-{i}") for i in range(5000)) + "\n")
    return tenv, tokens_file, embedded_servers


def main() -> int:
    load_at_start = os.getloadavg()[0]  # other work on the machine moves every figure: say how much there was
    tenv, tokens_file, embedded_servers = setup(OUT)
    dsn = tenv["TRACKER_DATABASE_URL"]
    bench_redis = redis.Redis.from_url(tenv["TRACKER_REDIS_URL"])
    signer = UserTokens(SECRET)

    def count_sessions() -> int:
        return sum(1 for _ in bench_redis.scan_iter(match="trkbench:s:*", count=10_000))

    script = str(ROOT / "benchmarks/go.lua")
    wenv = {"TOKENS_FILE": str(tokens_file)}
    postgres, redis_server = cpu.postgres_pids(dsn), cpu.redis_pids(tenv["TRACKER_REDIS_URL"])

    def meter(proc: subprocess.Popen[bytes], *, stores: bool = True, uses_redis: bool = True) -> cpu.Meter:
        groups = {"server": lambda: cpu.tree(proc.pid)}
        if stores:
            groups["postgres"] = postgres
        if uses_redis:
            groups["redis"] = redis_server
        return cpu.Meter(**groups)

    rows: list[tuple[str, dict[str, float], str]] = []

    def run_ceiling() -> dict[str, float]:
        port = free_port()
        plain = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/plain_app.py"), str(port), str(WORKERS)])
        try:
            wait_http(port, "/go/x")
            wrk(port, script, wenv, seconds=2)
            return metered_wrk(meter(plain, stores=False, uses_redis=False), port, script, wenv)
        finally:
            stop(plain)

    # The ceiling moves between runs on a shared machine: measure it before and after the /go
    # scenarios and compare against the mean of the two.
    def run_go(durability: str, pace_ms: int = 0) -> tuple[dict[str, float], str, bool]:
        port = free_port()
        floor = durability.startswith("floor-")
        if floor:  # the plain app that also hands each click to the writer, and does nothing else
            log = (OUT / f"{durability}.log").open("wb")
            proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/plain_app.py"), str(port), str(WORKERS),
                                     durability.removeprefix("floor-"), dsn], env=tenv, stdout=log, stderr=log)
        else:
            bench_redis.flushdb()
            log = (OUT / f"tracker-{durability}.log").open("wb")
            proc = subprocess.Popen([*TRACKER, "serve", "--port", str(port), "--workers", str(WORKERS)],
                                    env={**tenv, "TRACKER_DURABILITY": durability}, stdout=log, stderr=log)
        try:
            wait_http(port, "/go/x" if floor else "/readyz")
            paced = {**wenv, "GO_DELAY_MS": str(pace_ms)} if pace_ms else wenv
            warm = wrk(port, script, paced, seconds=2)
            time.sleep(1)
            before = asyncio.run(count_clicks(dsn))
            result = metered_wrk(meter(proc, uses_redis=not floor), port, script, paced)
        finally:
            stop(proc)
            log.close()
        after = asyncio.run(count_clicks(dsn))
        ok = result["non_3xx"] == 0 and after - before >= result["requests"]
        note = f"{after - before} rows for {result['requests']} requests ({'ok' if ok else 'MISMATCH'})"
        if not floor:  # every 302 also left its session in Redis (none dropped by a slow Redis)
            sessions, redirects = count_sessions(), int(warm["requests"] + result["requests"])
            ok = ok and sessions >= redirects
            note += f", {sessions} sessions for {redirects} redirects ({'ok' if sessions >= redirects else 'MISSING'})"
        return result, note, ok

    # The ceiling moves between runs on a shared machine: it is measured before and after every round
    # of /go scenarios, and each scenario's ratio is to the mean of the two ceilings around it.
    # BENCH_ROUNDS > 1 repeats the rounds and reports the round with the median ratio.
    ceilings = [run_ceiling()]
    rounds: dict[str, list[tuple[dict[str, float], str, bool]]] = {
        "commit": [], "async": [], "floor-commit": [], "floor-async": []}
    for _ in range(ROUNDS):
        for durability in rounds:
            rounds[durability].append(run_go(durability))
        ceilings.append(run_ceiling())
    ceiling: dict[str, float] = {key: sum(c[key] for c in ceilings) / len(ceilings)
                                 for key in ("rps", "p50_ms", "p99_ms", "cpu_us", "cpu_server")}
    rows.append((f"plain aiohttp 302 (ceiling, mean of {len(ceilings)} runs around the /go rounds)", ceiling,
                 ", ".join(f"{c['rps']:,.0f}" for c in ceilings)))
    for durability, runs in rounds.items():
        for i, (result, _, _) in enumerate(runs):
            around = (ceilings[i], ceilings[i + 1])
            result["ratio"] = result["rps"] / (sum(c["rps"] for c in around) / 2)
            result["cpu_ratio"] = sum(c["cpu_us"] for c in around) / 2 / result["cpu_us"]
        median = sorted(runs, key=lambda run: run[0]["cpu_ratio"])[len(runs) // 2]
        note = median[1]
        if len(runs) > 1:
            note += (f"; CPU ratios of {len(runs)} rounds: " + ", ".join(f"{r[0]['cpu_ratio']:.2f}" for r in runs)
                     + ("" if all(r[2] for r in runs) else " (a round MISMATCHED)"))
        name = (f"floor: plain aiohttp 302 + tracker's click writer only, durability={durability[6:]}"
                if durability.startswith("floor-") else f"tracker /go, durability={durability}")
        rows.append((name, median[0], note))

    # Below saturation: half of what the mode served at saturation in this run (its median round),
    # offered by letting each connection wait between requests (wrk's delay). Production runs at
    # HPA's 60 % CPU target, not at 100 %; a fixed wait would saturate a slower or busier machine.
    # The floor at the same offered load: what storing the click alone leaves of the latency.
    for durability in ("commit", "async"):
        saturated = sorted(r[0]["rps"] for r in rounds[durability])[len(rounds[durability]) // 2]
        pace_ms = max(1, round(1000 * CONNECTIONS / (saturated / 2)))
        result, note, _ = run_go(durability, pace_ms=pace_ms)
        rows.append((f"tracker /go, durability={durability}, paced at half its saturated rate (each connection "
                     f"waits {pace_ms} ms between requests)", result, note))
        result, note, _ = run_go(f"floor-{durability}", pace_ms=pace_ms)
        rows.append((f"floor: plain aiohttp 302 + tracker's click writer only, durability={durability}, paced "
                     f"the same ({pace_ms} ms)", result, note))

    # Observe and postbacks, one worker: requests/s per worker.
    port = free_port()
    log = (OUT / "tracker-one.log").open("wb")
    proc = subprocess.Popen([*TRACKER, "serve", "--port", str(port), "--workers", "1"],
                            env={**tenv, "TRACKER_DURABILITY": "commit"}, stdout=log, stderr=log)
    try:
        wait_http(port, "/readyz")
        clicks_file = OUT / "clicks.txt"
        clicks_file.write_text(asyncio.run(make_clicks(port, signer, 2000)))
        cenv = {"CLICKS_FILE": str(clicks_file)}
        for name, lua, extra in (("tracker POST /v1/observe (5 events), 1 worker", "observe.lua", {}),
                                 ("tracker /postback new orders, 1 worker", "postback.lua", {}),
                                 ("tracker /postback duplicates, 1 worker", "postback.lua", {"DUPLICATES": "1"})):
            script_path = str(ROOT / "benchmarks" / lua)
            wrk(port, script_path, {**cenv, **extra}, seconds=2)
            result = metered_wrk(meter(proc), port, script_path, {**cenv, **extra})
            rows.append((name, result, "ok" if result["non_3xx"] == 0 else f"{result['non_3xx']} non-2xx"))
    finally:
        stop(proc)
        log.close()

    if embedded_servers:
        # PostgreSQL down: redirects go on from the spool; afterwards every 302 has its row.
        from tracker import embedded

        root = Path(os.environ.get("TRACKER_DATA_DIR") or ROOT / ".data") / "embedded"
        port = free_port()
        log = (OUT / "tracker-pgdown.log").open("wb")
        proc = subprocess.Popen([*TRACKER, "serve", "--port", str(port), "--workers", str(WORKERS)],
                                env={**tenv, "TRACKER_DURABILITY": "commit"}, stdout=log, stderr=log)
        try:
            wait_http(port, "/readyz")
            before = asyncio.run(count_clicks(dsn))
            embedded.stop_postgres(root, mode="immediate")
            result = metered_wrk(meter(proc, stores=False), port, script, wenv)
            embedded.start_postgres(root)
            after = before
            for _ in range(600):
                time.sleep(0.5)
                try:
                    after = asyncio.run(count_clicks(dsn))
                except (OSError, asyncpg.PostgresError):
                    continue
                if after - before >= result["requests"]:
                    break
        finally:
            stop(proc)
            log.close()
        ok = result["non_3xx"] == 0 and after - before >= result["requests"]
        rows.append(("tracker /go while PostgreSQL is down (spool)", result,
                     f"{after - before} rows after recovery for {result['requests']} requests "
                     f"({'ok' if ok else 'MISMATCH'})"))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\n{stamp}, {os.cpu_count()} cores ({model}), wrk -t2 -c{CONNECTIONS} -d{SECONDS}s, "
          f"{WORKERS} server processes, load average {load_at_start:.2f} at the start and "
          f"{os.getloadavg()[0]:.2f} at the end (the run's own load included)\n")
    print("CPU: us per request, of the server's processes + PostgreSQL's + Redis's (benchmarks/cpu.py); "
          "CPU ratio: the plain 302's CPU per request over the scenario's.\n")
    print("| scenario | requests/s | p50 ms | p99 ms | CPU us/request | CPU ratio | req/s ratio | rows check |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, r, check in rows:
        ratio = r.get("ratio", r["rps"] / ceiling["rps"])
        cpu_ratio = r.get("cpu_ratio", ceiling["cpu_us"] / r["cpu_us"])
        print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {cpu_cell(r)} | "
              f"{cpu_ratio:.2f} | {ratio:.2f} | {check} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
