"""/go on a standalone Redis and on a Redis Cluster, both of Debian's redis-server started here (one
server; 3 masters and 3 replicas, as tests/stack.py starts them), in alternating wrk runs against `tracker serve` (2 workers),
with the CPU time of tracker's processes, PostgreSQL's and Redis's (every node of the cluster) read from
/proc around each run (benchmarks/cpu.py). The machine's speed drifts over minutes, so only interleaved
runs compare.

    .venv/bin/python benchmarks/cluster.py [--rounds 4] [--seconds 8]

Uses the PostgreSQL of TRACKER_DATABASE_URL, else the embedded one (only the benchmark database's
backends are metered)."""
from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import ab  # noqa: E402
import bench  # noqa: E402
import cpu  # noqa: E402

from tests.stack import REDIS_SERVER, RedisClusterNodes  # noqa: E402


def bus_port() -> int:
    """A port free with port + 10000 (a cluster node's bus), both below the ephemeral range."""
    for _ in range(1000):
        port = random.randrange(10000, 22000)
        try:
            for each in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", each))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def node_pids(ports: list[int]) -> list[int]:
    pids = []
    for port in ports:
        try:
            pids.append(int(redis.Redis(port=port).info("server")["process_id"]))
        except redis.ConnectionError:
            pass
    return pids


def run_once(env: dict[str, str], redis_pids: list[int], seconds: int, wenv: dict[str, str]) -> dict[str, float]:
    proc, port = ab.serve(ROOT, env, 2)
    try:
        script = str(ROOT / "benchmarks" / "go.lua")
        bench.wrk(port, script, wenv, seconds=2)
        time.sleep(0.5)
        meter = cpu.Meter(server=lambda: cpu.tree(proc.pid), postgres=cpu.postgres_pids(env["TRACKER_DATABASE_URL"]),
                          redis=lambda: redis_pids)
        return bench.metered_wrk(meter, port, script, wenv, seconds=seconds)
    finally:
        bench.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tracker-cluster-bench-"))
    tenv, tokens, _ = bench.setup(scratch)
    nodes = RedisClusterNodes([bus_port() for _ in range(6)])
    nodes.start()
    port = bus_port()
    single = subprocess.Popen([str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    setups = {"standalone": ({**tenv, "TRACKER_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, [single.pid]),
              "cluster": ({**tenv, "TRACKER_REDIS_URL": nodes.url()}, node_pids(nodes.ports))}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    try:
        for i in range(args.rounds):
            for name in (("standalone", "cluster") if i % 2 == 0 else ("cluster", "standalone")):
                env, pids = setups[name]
                r = run_once(env, pids, args.seconds, {"TOKENS_FILE": str(tokens)})
                results[name].append(r)
                print(f"round {i + 1} {name}: {r['rps']:,.0f} req/s  {bench.cpu_cell(r)} us CPU/redirect  "
                      f"p99 {r['p99_ms']:.2f} ms  non-3xx {r['non_3xx']}", flush=True)
    finally:
        nodes.close()
        single.kill()
        single.wait()
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
    for name, rs in results.items():
        print(f"{name}: median {statistics.median(r['rps'] for r in rs):,.0f} req/s, "
              f"{statistics.median(r['cpu_us'] for r in rs):.1f} us CPU/redirect (workers "
              f"{statistics.median(r['cpu_server'] for r in rs):.1f}, PostgreSQL "
              f"{statistics.median(r['cpu_postgres'] for r in rs):.1f}, Redis "
              f"{statistics.median(r['cpu_redis'] for r in rs):.1f}), "
              f"p99 {statistics.median(r['p99_ms'] for r in rs):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
