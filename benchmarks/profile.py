"""Profile one `tracker serve` worker under wrk with py-spy and print where its samples go.

    .venv/bin/python benchmarks/profile.py [--seconds 10] [--durability commit] [--top 40]

Needs py-spy (`.venv/bin/pip install py-spy`) and wrk. Prints the functions with the most samples,
inclusive (the function or anything it calls) and self (the function's own code), as shares of all
samples of the worker; the raw collapsed stacks are left in benchmarks/results/profile.txt."""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import cpu  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--durability", default="commit")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    tenv, tokens, _ = bench.setup(bench.OUT)
    tenv["TRACKER_DURABILITY"] = args.durability
    tracker = bench.TRACKER
    wenv = {"TOKENS_FILE": str(tokens)}
    port = bench.free_port()
    proc = subprocess.Popen([*tracker, "serve", "--port", str(port), "--workers", "2"], env=tenv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = bench.OUT / "profile.txt"
    try:
        bench.wait_http(port, "/readyz")
        script = str(ROOT / "benchmarks/go.lua")
        bench.wrk(port, script, wenv, 2)
        load = threading.Thread(target=bench.wrk, args=(port, script, wenv, args.seconds + 3))
        load.start()
        time.sleep(1)
        worker = cpu.tree(proc.pid)[1]
        subprocess.run(["py-spy", "record", "-r", "200", "-d", str(args.seconds), "-p", str(worker), "-f", "raw",
                        "-o", str(out), "--nonblocking"], check=True, capture_output=True)
        load.join()
    finally:
        bench.stop(proc)
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f.rsplit(" (", 1)[0] + " (" + f.rsplit(" (", 1)[-1].split("/")[-1] for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    print(f"{total} samples\n\ninclusive:")
    for frame, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    print("\nself:")
    for frame, n in own.most_common(args.top):
        print(f"{100 * n / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
