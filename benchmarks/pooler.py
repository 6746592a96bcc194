"""What PgBouncer in transaction pooling mode costs per redirect and per postback: alternating wrk runs
against `tracker serve` on PostgreSQL directly and behind a PgBouncer started for the run (Debian's,
as tests/stack.py starts it: transaction mode, run as an unprivileged user when started as root),
with the CPU per request of tracker's workers, PostgreSQL's processes, Redis and PgBouncer read from
/proc (benchmarks/cpu.py), and a plain aiohttp 302 app measured in every round as the reference.

    .venv/bin/python benchmarks/pooler.py [--rounds 3] [--seconds 8] [--durability commit|async]
        [--scenario go postback postback-duplicates] [--postback-connections 16]
        [--go-delay-ms N] [--postback-delay-ms N]

Three set-ups, in a different order each round:
- `direct`: TRACKER_DATABASE_URL is PostgreSQL (asyncpg's statement cache on, as without a pooler);
- `cache-off`: TRACKER_DATABASE_POOLER=transaction with both URLs on PostgreSQL itself: what turning the
  statement cache off costs, without the extra hop;
- `pgbouncer`: TRACKER_DATABASE_POOLER=transaction, TRACKER_DATABASE_URL the PgBouncer,
  TRACKER_DATABASE_DIRECT_URL PostgreSQL (as operators run it).
/go runs with BENCH_WORKERS (2) workers and BENCH_CONNECTIONS (64) connections, postbacks with one worker
(as benchmarks/run does) and 16 connections: one worker does a few hundred postbacks a second, and 64
waiting on it on a busy machine ran into wrk's 2 s timeout. Every /go run checks that each counted 302
has its row, every run that nothing was refused or timed out. At saturation a set-up that serves fewer
requests a second spreads each worker's fixed background work (sequencer, dispatcher, probes) over fewer
of them; `--go-delay-ms` and `--postback-delay-ms` let each wrk connection wait between its requests, so
that every set-up serves about the same rate below saturation. Uses the servers of TRACKER_DATABASE_URL / TRACKER_REDIS_URL, else
the embedded ones (which keep other clients off the Redis whose CPU is counted). Needs wrk and
pgbouncer (apt-get install wrk pgbouncer)."""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import cpu  # noqa: E402

from tests.stack import PGBOUNCER, PgBouncer  # noqa: E402
from tracker.domain.tokens import UserTokens  # noqa: E402

SCRIPTS = {"go": ("go.lua", {}), "postback": ("postback.lua", {}),
           "postback-duplicates": ("postback.lua", {"DUPLICATES": "1"})}
SETUPS = ("direct", "cache-off", "pgbouncer")
GROUPS = ("server", "postgres", "redis", "pgbouncer")


def setup_env(tenv: dict[str, str], setup: str, bouncer: PgBouncer, database: str) -> dict[str, str]:
    env = {k: v for k, v in tenv.items() if not k.startswith(("TRACKER_DATABASE_POOLER", "TRACKER_DATABASE_DIRECT"))}
    if setup == "cache-off":
        env.update(TRACKER_DATABASE_POOLER="transaction", TRACKER_DATABASE_DIRECT_URL=tenv["TRACKER_DATABASE_URL"])
    elif setup == "pgbouncer":
        env.update(TRACKER_DATABASE_POOLER="transaction", TRACKER_DATABASE_DIRECT_URL=tenv["TRACKER_DATABASE_URL"],
                   TRACKER_DATABASE_URL=bouncer.url(database))
    return env


def serve(env: dict[str, str], workers: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = bench.free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([*bench.TRACKER, "serve", "--port", str(port), "--workers", str(workers)],
                                env=env, stdout=out, stderr=out)
    bench.wait_http(port, "/readyz")
    return proc, port


def measure(meter_of: Callable[[subprocess.Popen[bytes]], cpu.Meter], proc: subprocess.Popen[bytes], port: int,
            scenario: str, wenv: dict[str, str], seconds: int, connections: int) -> dict[str, float]:
    name, extra = SCRIPTS[scenario]
    script = str(ROOT / "benchmarks" / name)
    bench.wrk(port, script, {**wenv, **extra}, seconds=2, connections=connections)
    time.sleep(0.5)
    return bench.metered_wrk(meter_of(proc), port, script, {**wenv, **extra}, seconds=seconds,
                             connections=connections)


def cell(result: dict[str, float]) -> str:
    parts = " + ".join(f"{result['cpu_' + g]:.1f}" for g in GROUPS)
    return f"{result['cpu_us']:.1f} ({parts})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--durability", default="commit")
    parser.add_argument("--scenario", nargs="+", choices=SCRIPTS, default=["go", "postback"])
    parser.add_argument("--postback-connections", type=int, default=16)
    parser.add_argument("--go-delay-ms", type=int, default=0)
    parser.add_argument("--postback-delay-ms", type=int, default=0)
    args = parser.parse_args()
    if not Path(PGBOUNCER).exists():
        print(f"benchmarks/pooler.py: {PGBOUNCER} is missing: apt-get install -y pgbouncer", file=sys.stderr)
        return 2
    load_at_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="tracker-pooler-"))
    tenv, tokens, _ = bench.setup(scratch)
    tenv["TRACKER_DURABILITY"] = args.durability
    dsn = tenv["TRACKER_DATABASE_URL"]
    bouncer = PgBouncer(dsn)
    bouncer.start()
    bench_redis = redis.Redis.from_url(tenv["TRACKER_REDIS_URL"])
    postgres, redis_server = cpu.postgres_pids(dsn), cpu.redis_pids(tenv["TRACKER_REDIS_URL"])
    bouncer_pid = bouncer.proc.pid if bouncer.proc else 0

    def meter_of(proc: subprocess.Popen[bytes], stores: bool = True) -> cpu.Meter:
        groups: dict[str, Callable[[], list[int]]] = {"server": lambda: cpu.tree(proc.pid)}
        if stores:
            groups.update(postgres=postgres, redis=redis_server, pgbouncer=lambda: cpu.tree(bouncer_pid))
        return cpu.Meter(**groups)

    log = scratch / "tracker.log"
    wenv = {"TOKENS_FILE": str(tokens), "CLICKS_FILE": str(scratch / "clicks.txt")}
    paced = {**wenv, **({"GO_DELAY_MS": str(args.go_delay_ms)} if args.go_delay_ms else {}),
             **({"DELAY_MS": str(args.postback_delay_ms)} if args.postback_delay_ms else {})}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    plain: list[dict[str, float]] = []
    checks: list[str] = []
    try:
        if any(s != "go" for s in args.scenario):  # clicks to convert, made once through /go
            proc, port = serve(tenv, 1, log)
            try:
                (scratch / "clicks.txt").write_text(asyncio.run(bench.make_clicks(port, UserTokens(bench.SECRET), 2000)))
            finally:
                bench.stop(proc)
        for i in range(args.rounds):
            port = bench.free_port()
            app = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/plain_app.py"), str(port), str(bench.WORKERS)])
            try:
                bench.wait_http(port, "/go/x")
                r = measure(lambda p: meter_of(p, stores=False), app, port, "go", wenv, args.seconds,
                            bench.CONNECTIONS)
            finally:
                bench.stop(app)
            plain.append(r)
            print(f"round {i + 1} plain 302: {r['rps']:,.0f} req/s  {r['cpu_us']:.1f} us CPU/request", flush=True)
            order = SETUPS[i % len(SETUPS):] + SETUPS[:i % len(SETUPS)]
            for scenario in args.scenario:
                for setup in order:
                    bench_redis.flushdb()
                    env = setup_env(tenv, setup, bouncer, bench.BENCH_DB)
                    proc, port = serve(env, bench.WORKERS if scenario == "go" else 1, log)
                    try:
                        before = asyncio.run(bench.count_clicks(dsn))
                        r = measure(meter_of, proc, port, scenario, paced, args.seconds,
                                    bench.CONNECTIONS if scenario == "go" else args.postback_connections)
                    finally:
                        bench.stop(proc)
                    problems = [f"{r[k]:.0f} {k}" for k in ("non_3xx", "errors") if r[k]]
                    if scenario == "go":  # every counted 302 has its row (the warm-up's rows come on top)
                        rows = asyncio.run(bench.count_clicks(dsn)) - before
                        if rows < r["requests"]:
                            problems.append(f"{rows} rows for {r['requests']:.0f} redirects")
                    ok = not problems
                    if problems:
                        checks.append(f"round {i + 1} {scenario} {setup}: {', '.join(problems)}")
                    results.setdefault((scenario, setup), []).append(r)
                    print(f"round {i + 1} {scenario} {setup}: {r['rps']:,.0f} req/s  {cell(r)} us CPU/request  "
                          f"p99 {r['p99_ms']:.2f} ms{'' if ok else '  CHECK FAILED'}", flush=True)
    finally:
        bouncer.close()
        shutil.rmtree(scratch, ignore_errors=True)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_at_end = os.getloadavg()
    print(f"\n{stamp}, {os.cpu_count()} cores, wrk -t2 -d{args.seconds}s, -c{bench.CONNECTIONS} on /go and "
          f"-c{args.postback_connections} on postbacks, "
          f"each connection waiting {args.go_delay_ms} ms (/go) and {args.postback_delay_ms} ms (postbacks) "
          f"between requests, "
          f"durability={args.durability}, {args.rounds} rounds; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.2f}' for x in load_at_start)} at the start and "
          f"{', '.join(f'{x:.2f}' for x in load_at_end)} at the end (the run's own load included)\n")
    print("Medians over the rounds. CPU: us per request, workers + PostgreSQL + Redis + PgBouncer. "
          "vs direct: the median over rounds of each round's difference to that round's direct run.\n")
    print("| scenario | set-up | requests/s | p50 ms | p99 ms | CPU us/request | vs direct |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    med = statistics.median
    print(f"| plain aiohttp 302, {bench.WORKERS} workers | | {med(r['rps'] for r in plain):,.0f} | "
          f"{med(r['p50_ms'] for r in plain):.2f} | {med(r['p99_ms'] for r in plain):.2f} | "
          f"{med(r['cpu_us'] for r in plain):.1f} | |")
    for scenario in args.scenario:
        direct = results[(scenario, "direct")]
        for setup in SETUPS:
            rs = results[(scenario, setup)]
            parts = " + ".join(f"{med(r[f'cpu_{g}'] for r in rs):.1f}" for g in GROUPS)
            diff = "" if setup == "direct" else \
                f"{med(r['cpu_us'] - d['cpu_us'] for r, d in zip(rs, direct)):+.1f} us"
            print(f"| {scenario} | {setup} | {med(r['rps'] for r in rs):,.0f} | {med(r['p50_ms'] for r in rs):.2f} | "
                  f"{med(r['p99_ms'] for r in rs):.2f} | {med(r['cpu_us'] for r in rs):.1f} ({parts}) | {diff} |")
    print("\nChecks: " + ("every request answered, every counted 302 stored" if not checks else "; ".join(checks)
                          + " (errors: wrk's connect, read and 2 s timeout errors)"))
    return 1 if checks else 0


if __name__ == "__main__":
    sys.exit(main())
