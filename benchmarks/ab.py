"""A/B of two builds of the /go path: alternating wrk runs against `tracker serve` from each build,
with the CPU time of tracker's processes, PostgreSQL's and Redis's read from /proc around each run
(benchmarks/cpu.py). The machine's speed drifts over
minutes, so only interleaved runs compare; CPU per redirect moves less than requests/s.

    .venv/bin/python benchmarks/ab.py REV_A REV_B [--rounds 4] [--seconds 8] [--durability commit] [--pace-ms N]
        [--scenario go|observe|postback|postback-duplicates]

A revision is anything `git worktree add` takes (HEAD~1, a commit, a branch) or `.` for the working
tree. Uses the servers of TRACKER_DATABASE_URL / TRACKER_REDIS_URL, else the embedded ones."""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import cpu  # noqa: E402

from tracker.domain.tokens import UserTokens  # noqa: E402


def tree_of(rev: str, scratch: Path) -> Path:
    if rev == ".":
        return ROOT
    path = scratch / rev.replace("/", "_").replace("~", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
                   check=True, capture_output=True)
    return path


def writer_totals(port: int) -> dict[str, float]:
    """Sums and counts of the writer's batch-size and flush-time histograms, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    totals = {}
    for name in ("tracker_writer_batch_size_sum", "tracker_writer_batch_size_count",
                 "tracker_writer_flush_seconds_sum"):
        totals[name] = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
    return totals


# The scenarios besides /go, as benchmarks/run runs them (one worker): the wrk script and its variables.
SCRIPTS = {"go": ("go.lua", {}), "observe": ("observe.lua", {}), "postback": ("postback.lua", {}),
           "postback-duplicates": ("postback.lua", {"DUPLICATES": "1"})}


def serve(tree: Path, env: dict[str, str], workers: int) -> tuple[subprocess.Popen[bytes], int]:
    port = bench.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(port),
                             "--workers", str(workers)], env={**env, "PYTHONPATH": str(tree)}, cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.wait_http(port, "/readyz")
    return proc, port


def run_once(tree: Path, env: dict[str, str], seconds: int, wenv: dict[str, str],
             scenario: str = "go") -> dict[str, float]:
    proc, port = serve(tree, env, 2 if scenario == "go" else 1)
    try:
        name, extra = SCRIPTS[scenario]
        script, wenv = str(ROOT / "benchmarks" / name), {**wenv, **extra}
        bench.wrk(port, script, wenv, seconds=2)
        time.sleep(0.5)
        meter = cpu.Meter(server=lambda: cpu.tree(proc.pid), postgres=cpu.postgres_pids(env["TRACKER_DATABASE_URL"]),
                          redis=cpu.redis_pids(env["TRACKER_REDIS_URL"]))
        writer_before = writer_totals(port)
        result = bench.metered_wrk(meter, port, script, wenv, seconds=seconds)
        writer = {k: v - writer_before[k] for k, v in writer_totals(port).items()}
        copies = writer["tracker_writer_batch_size_count"] or 1
        result["rows_per_copy"] = writer["tracker_writer_batch_size_sum"] / copies
        result["flush_ms"] = writer["tracker_writer_flush_seconds_sum"] / copies * 1000
        return result
    finally:
        bench.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--durability", default="commit")
    parser.add_argument("--scenario", choices=SCRIPTS, default="go",
                        help="what wrk sends: /go (2 workers) or, as benchmarks/run does with 1 worker, "
                             "observe, new-order postbacks or duplicate postbacks")
    parser.add_argument("--pace-ms", type=int, default=0,
                        help="each wrk connection waits this long between requests (a load below saturation)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tracker-ab-"))
    tenv, tokens, _ = bench.setup(scratch)
    tenv["TRACKER_DURABILITY"] = args.durability
    bench_redis = redis.Redis.from_url(tenv["TRACKER_REDIS_URL"])
    trees = {"A": tree_of(args.a, scratch), "B": tree_of(args.b, scratch)}
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    clicks = scratch / "clicks.txt"  # clicks to observe and convert, made once through A's /go
    if args.scenario != "go":
        proc, port = serve(trees["A"], tenv, 1)
        try:
            clicks.write_text(asyncio.run(bench.make_clicks(port, UserTokens(bench.SECRET), 2000)))
        finally:
            bench.stop(proc)
    try:
        for i in range(args.rounds):
            for name in (("A", "B") if i % 2 == 0 else ("B", "A")):
                bench_redis.flushdb()
                wenv = {"TOKENS_FILE": str(tokens), "CLICKS_FILE": str(clicks),
                        **({"GO_DELAY_MS": str(args.pace_ms)} if args.pace_ms else {})}
                r = run_once(trees[name], tenv, args.seconds, wenv, args.scenario)
                results[name].append(r)
                print(f"round {i + 1} {name}: {r['rps']:,.0f} req/s  {bench.cpu_cell(r)} us CPU/redirect  "
                      f"p99 {r['p99_ms']:.2f} ms  non-3xx {r['non_3xx']}  "
                      f"{r['rows_per_copy']:.1f} rows/COPY, {r['flush_ms']:.2f} ms/COPY", flush=True)
    finally:
        for name, rev in (("A", args.a), ("B", args.b)):
            if rev != ".":
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[name])],
                               capture_output=True)
    for name, rev in (("A", args.a), ("B", args.b)):
        rs = results[name]
        print(f"{name} ({rev}): median {statistics.median(r['rps'] for r in rs):,.0f} req/s, "
              f"{statistics.median(r['cpu_us'] for r in rs):.1f} us CPU/redirect (workers "
              f"{statistics.median(r['cpu_server'] for r in rs):.1f}, PostgreSQL "
              f"{statistics.median(r['cpu_postgres'] for r in rs):.1f}, Redis "
              f"{statistics.median(r['cpu_redis'] for r in rs):.1f}), "
              f"p99 {statistics.median(r['p99_ms'] for r in rs):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
