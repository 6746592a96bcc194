"""The whole stack past one machine against the single box: CPU per redirect of `tracker serve` on
PostgreSQL and one Redis, and of two instances behind PgBouncer in transaction mode on a Redis Cluster
(3 masters, 3 replicas), each engine also added alone, in alternating rounds with a plain aiohttp 302
in every round. CPU per redirect is read from /proc (benchmarks/cpu.py) for tracker's workers, the
PostgreSQL processes of the benchmark's database, Redis (the standalone server, or all six cluster
nodes: replicas replicate every write) and PgBouncer. The standalone Redis and the cluster's nodes are
the same redis-server (Debian's), so that the difference is the cluster's.

    .venv/bin/python benchmarks/stack.py [--rounds 3] [--seconds 8] [--go-delay-ms N]

Set-ups, two worker processes in each:
- `single`: one instance with 2 workers, PostgreSQL directly, one standalone Redis (benchmarks/run's box);
- `pgbouncer`: the same behind PgBouncer (TRACKER_DATABASE_POOLER=transaction, the primary as the
  direct URL);
- `cluster`: the same with the Redis Cluster instead of the standalone Redis;
- `two-pods`: two instances of 1 worker each, each with its own data directory and spool, PostgreSQL
  directly and the standalone Redis;
- `stack`: two instances of 1 worker each behind PgBouncer on the Redis Cluster.
With two instances wrk runs twice at once, half the connections each (p50 and p99: the worse of the
two). Every run checks that each counted 302 has its row in PostgreSQL and its session in Redis. The
engines are Debian's (pgbouncer, redis-server, redis-cli: apt-get install pgbouncer redis-server wrk),
started here as tests/stack.py starts them; PostgreSQL is the variable's server or the embedded one."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
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

from tests.stack import PGBOUNCER, REDIS_SERVER, PgBouncer, RedisClusterNodes, engine_user, wait_port  # noqa: E402

SETUPS = ("single", "pgbouncer", "cluster", "two-pods", "stack")
GROUPS = ("server", "postgres", "redis", "pgbouncer")


def bus_port(taken: set[int]) -> int:
    """A port for a cluster node whose bus (port + 10000) is free too, both below the ephemeral range."""
    for port in range(21000, 22000):
        if port in taken:
            continue
        try:
            for each in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", each))
        except OSError:
            continue
        taken.add(port)
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wrk_many(ports: list[int], env: dict[str, str], seconds: int, connections: int) -> dict[str, float]:
    """wrk against each port at once, `connections` split between them; requests and errors summed."""
    script = str(ROOT / "benchmarks" / "go.lua")
    each = max(1, connections // len(ports))
    procs = [subprocess.Popen(["wrk", "-t1" if len(ports) > 1 else "-t2", f"-c{each}", f"-d{seconds}s", "--latency",
                               "-s", script, f"http://127.0.0.1:{port}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "BENCH_LUA_DIR": str(ROOT / "benchmarks"), **env})
             for port in ports]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        match = re.search(r"^JSON (.*)$", out, re.M)
        if proc.returncode != 0 or not match:
            raise RuntimeError(out + err)
        results.append(json.loads(match.group(1)))
    total = {key: sum(r[key] for r in results) for key in ("requests", "errors", "non_3xx")}
    total.update({key: max(r[key] for r in results) for key in ("seconds", "p50_ms", "p99_ms")})
    total["rps"] = sum(r["requests"] / r["seconds"] for r in results)
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--go-delay-ms", type=int, default=0)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    args = parser.parse_args()
    for tool in (PGBOUNCER, REDIS_SERVER, "/usr/bin/wrk"):
        if not Path(tool).exists():
            print(f"benchmarks/stack.py: {tool} is missing: apt-get install -y pgbouncer redis-server wrk",
                  file=sys.stderr)
            return 2
    load_at_start = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="tracker-stack-"))
    tenv, tokens, _ = bench.setup(scratch)
    dsn = tenv["TRACKER_DATABASE_URL"]
    bouncer = PgBouncer(dsn)
    taken: set[int] = set()
    cluster = RedisClusterNodes([bus_port(taken) for _ in range(6)])
    standalone_port = bus_port(taken)
    server = subprocess.Popen([REDIS_SERVER, "--port", str(standalone_port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], user=engine_user(), stdout=subprocess.DEVNULL)
    standalone_url = f"redis://127.0.0.1:{standalone_port}/0"
    standalone = redis.Redis(port=standalone_port)
    postgres = cpu.postgres_pids(dsn)
    wenv = {"TOKENS_FILE": str(tokens), **({"GO_DELAY_MS": str(args.go_delay_ms)} if args.go_delay_ms else {})}
    results: dict[str, list[dict[str, float]]] = {}
    plain: list[dict[str, float]] = []
    checks: list[str] = []
    try:
        bouncer.start()
        cluster.start()
        wait_port(standalone_port, server)
        standalone_pids = cpu.redis_pids(standalone_url)
        bouncer_pid = bouncer.proc.pid if bouncer.proc else 0

        def cluster_pids() -> list[int]:
            return [p.pid for p in cluster.procs.values()]

        def masters() -> list[redis.Redis]:
            return [redis.Redis(port=port) for port in cluster.masters()]

        def sessions(clustered: bool) -> int:
            clients = masters() if clustered else [standalone]
            return sum(1 for c in clients for _ in c.scan_iter(match="trkbench:s:*", count=10_000))

        def env_of(setup: str, instance: int) -> dict[str, str]:
            env = {**tenv, "TRACKER_DURABILITY": "commit", "TRACKER_REDIS_URL": standalone_url,
                   "TRACKER_DATA_DIR": str(scratch / f"{setup}-{instance}")}
            if setup in ("pgbouncer", "stack"):
                env.update(TRACKER_DATABASE_POOLER="transaction", TRACKER_DATABASE_DIRECT_URL=dsn,
                           TRACKER_DATABASE_URL=bouncer.url(bench.BENCH_DB))
            if setup in ("cluster", "stack"):
                env["TRACKER_REDIS_URL"] = cluster.url()
            return env

        for i in range(args.rounds):
            port = bench.free_port()
            app = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/plain_app.py"), str(port), str(bench.WORKERS)])
            try:
                bench.wait_http(port, "/go/x")
                wrk_many([port], wenv, 2, bench.CONNECTIONS)
                meter = cpu.Meter(server=lambda pid=app.pid: cpu.tree(pid))
                before = meter.snapshot()
                r = wrk_many([port], {"TOKENS_FILE": str(tokens)}, args.seconds, bench.CONNECTIONS)
                r["cpu_us"] = sum(meter.spent(before).values()) / r["requests"] * 1e6
            finally:
                bench.stop(app)
            plain.append(r)
            print(f"round {i + 1} plain 302: {r['rps']:,.0f} req/s  {r['cpu_us']:.1f} us CPU/request", flush=True)
            order = args.setups[i % len(args.setups):] + args.setups[:i % len(args.setups)]
            for setup in order:
                clustered = setup in ("cluster", "stack")
                for client in (masters() if clustered else [standalone]):
                    client.flushdb()
                instances = 2 if setup in ("two-pods", "stack") else 1
                procs = []
                log = (scratch / f"{setup}.log").open("ab")
                try:
                    for n in range(instances):
                        p = bench.free_port()
                        procs.append((subprocess.Popen(
                            [*bench.TRACKER, "serve", "--port", str(p), "--workers", str(bench.WORKERS // instances)],
                            env=env_of(setup, n), stdout=log, stderr=log), p))
                    for _, p in procs:
                        bench.wait_http(p, "/readyz")
                    ports = [p for _, p in procs]
                    warm = wrk_many(ports, wenv, 2, bench.CONNECTIONS)
                    time.sleep(0.5)
                    groups: dict[str, Callable[[], list[int]]] = {
                        "server": lambda roots=[proc.pid for proc, _ in procs]: [
                            pid for root in roots for pid in cpu.tree(root)],
                        "postgres": postgres, "redis": cluster_pids if clustered else standalone_pids,
                        "pgbouncer": lambda: cpu.tree(bouncer_pid)}
                    meter = cpu.Meter(**groups)
                    rows_before = asyncio.run(bench.count_clicks(dsn))
                    before = meter.snapshot()
                    r = wrk_many(ports, wenv, args.seconds, bench.CONNECTIONS)
                    spent = meter.spent(before)
                finally:
                    for proc, _ in procs:
                        bench.stop(proc)
                    log.close()
                for group, seconds in spent.items():
                    r[f"cpu_{group}"] = seconds / r["requests"] * 1e6
                r["cpu_us"] = sum(spent.values()) / r["requests"] * 1e6
                rows = asyncio.run(bench.count_clicks(dsn)) - rows_before
                stored = sessions(clustered)
                problems = [f"{r[k]:.0f} {k}" for k in ("non_3xx", "errors") if r[k]]
                if rows < r["requests"]:
                    problems.append(f"{rows} rows for {r['requests']:.0f} redirects")
                if stored < r["requests"] + warm["requests"]:
                    problems.append(f"{stored} sessions for {r['requests'] + warm['requests']:.0f} redirects")
                if problems:
                    checks.append(f"round {i + 1} {setup}: {', '.join(problems)}")
                results.setdefault(setup, []).append(r)
                parts = " + ".join(f"{r['cpu_' + g]:.1f}" for g in GROUPS)
                print(f"round {i + 1} {setup}: {r['rps']:,.0f} req/s  {r['cpu_us']:.1f} ({parts}) us CPU/redirect  "
                      f"p99 {r['p99_ms']:.2f} ms{'  CHECK FAILED' if problems else ''}", flush=True)
    finally:
        server.kill()
        server.wait()
        cluster.close()
        bouncer.close()
        shutil.rmtree(scratch, ignore_errors=True)

    med = statistics.median
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_at_end = os.getloadavg()
    print(f"\n{stamp}, {os.cpu_count()} cores, wrk -d{args.seconds}s -c{bench.CONNECTIONS} in all, each connection "
          f"waiting {args.go_delay_ms} ms between requests, {bench.WORKERS} worker processes in every set-up, "
          f"durability=commit, {args.rounds} rounds; load average (1, 5, 15 min) "
          f"{', '.join(f'{x:.2f}' for x in load_at_start)} at the start and "
          f"{', '.join(f'{x:.2f}' for x in load_at_end)} at the end (the run's own load included)\n")
    print("Medians over the rounds. CPU: us per redirect, workers + PostgreSQL + Redis + PgBouncer. vs single: "
          "the median over rounds of each round's difference to that round's single run.\n")
    print("| set-up | requests/s | p50 ms | p99 ms | CPU us/redirect | vs single |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| plain aiohttp 302, {bench.WORKERS} workers | {med(r['rps'] for r in plain):,.0f} | "
          f"{med(r['p50_ms'] for r in plain):.2f} | {med(r['p99_ms'] for r in plain):.2f} | "
          f"{med(r['cpu_us'] for r in plain):.1f} | |")
    single = results.get("single")
    for setup in args.setups:
        rs = results[setup]
        parts = " + ".join(f"{med(r['cpu_' + g] for r in rs):.1f}" for g in GROUPS)
        diff = "" if setup == "single" or single is None else \
            f"{med(r['cpu_us'] - s['cpu_us'] for r, s in zip(rs, single)):+.1f} us"
        print(f"| {setup} | {med(r['rps'] for r in rs):,.0f} | {med(r['p50_ms'] for r in rs):.2f} | "
              f"{med(r['p99_ms'] for r in rs):.2f} | {med(r['cpu_us'] for r in rs):.1f} ({parts}) | {diff} |")
    print("\nChecks: " + ("every redirect answered 302, stored in PostgreSQL and its session in Redis" if not checks
                          else "; ".join(checks)))
    return 1 if checks else 0


if __name__ == "__main__":
    sys.exit(main())
