"""Instructions per request of one server process under load, counted by valgrind's callgrind: the
same for the same build and load whatever else the machine is doing, unlike CPU seconds on a shared
2-core machine, so it shows a change of a few percent that wrk's rounds cannot. It counts user-space
instructions only (Python, uvloop, asyncpg, hiredis), not the kernel's side of a send() or the
PostgreSQL and Redis servers (benchmarks/run and ab.py read those from /proc).

    .venv/bin/python benchmarks/instructions.py REV [REV ...] [--seconds 10] [--connections 16]
        [--durability async] [--rounds 1]

A revision is anything `git worktree add` takes, a checkout's directory (`.`), or `plain` for the plain
aiohttp 302 (benchmarks/plain_app.py). Each runs `tracker serve --workers 1` (one process) under
callgrind with counting off; after a warm-up, counting is switched on for a wrk run and off again.
Uses the servers of TRACKER_DATABASE_URL / TRACKER_REDIS_URL, else the embedded ones. Needs valgrind
(apt-get install valgrind) and wrk."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import ab  # noqa: E402
import bench  # noqa: E402
import cpu  # noqa: E402


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def count(tree: Path | None, env: dict[str, str], seconds: int, connections: int, wenv: dict[str, str],
          scratch: Path) -> tuple[float, int]:
    """Instructions per request, and the requests counted."""
    port = bench.free_port()
    out = scratch / f"callgrind.{port}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
    if tree is None:  # the plain app, one worker process (it forks it: valgrind follows)
        argv = [*valgrind, "--trace-children=yes", sys.executable, str(ROOT / "benchmarks/plain_app.py"),
                str(port), "1"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = "/go/x"
    else:
        argv = [*valgrind, sys.executable, "-m", "tracker.cli", "serve", "--port", str(port), "--workers", "1"]
        proc = subprocess.Popen(argv, env={**env, "PYTHONPATH": str(tree)}, cwd=tree,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = "/readyz"
    try:
        bench.wait_http(port, path, timeout=300)
        script = str(ROOT / "benchmarks/go.lua")
        bench.wrk(port, script, wenv, seconds=3, connections=connections)
        time.sleep(0.5)
        worker = max(cpu.tree(proc.pid)) if tree is None else proc.pid
        callgrind(worker, "-i", "on")
        result = bench.wrk(port, script, wenv, seconds=seconds, connections=connections)
        callgrind(worker, "-i", "off")
        callgrind(worker, "-d")
        dumps = sorted(scratch.glob(f"callgrind.{port}.{worker}*"))
        total = sum(int(m.group(1)) for d in dumps
                    for m in re.finditer(r"^totals: (\d+)", d.read_text(errors="replace"), re.M))
        return total / result["requests"], int(result["requests"])
    finally:
        bench.stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--durability", default="async")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        print("instructions.py: valgrind is missing: apt-get install -y valgrind", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="tracker-instructions-"))
    tenv, tokens, _ = bench.setup(scratch)
    tenv["TRACKER_DURABILITY"] = args.durability
    trees: dict[str, Path | None] = {
        rev: None if rev == "plain" else Path(rev) if Path(rev, "tracker").is_dir() else ab.tree_of(rev, scratch)
        for rev in args.revs}
    try:
        for i in range(args.rounds):
            for rev, tree in trees.items():
                per_request, requests = count(tree, tenv, args.seconds, args.connections,
                                              {"TOKENS_FILE": str(tokens)}, scratch)
                print(f"round {i + 1} {rev}: {per_request:,.0f} instructions per request ({requests} requests, "
                      f"durability={args.durability}, {args.connections} connections)", flush=True)
    finally:
        for rev, tree in trees.items():
            if tree is not None and not Path(rev, "tracker").is_dir():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
