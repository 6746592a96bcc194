"""Does a flood of activations by one user slow the others? Usage: .venv/bin/python benchmarks/flood.py
(BENCH_SECONDS, BENCH_WORKERS as for benchmarks/run).

The service runs with the production per-user limit (TRACKER_RATE_LIMIT_USER=60). All load comes from
127.0.0.1, so the per-IP limit is lifted here, or it would refuse everyone alike. Three runs of
`normal` (many users, 16 connections) are compared: alone; beside a flood of 48 connections by one
user (answered 429 past the limit); beside 48 connections of ordinary traffic from other users (the
same load, admitted). The flood should cost the others less than the same amount of real traffic."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

from bench import ROOT, SECONDS, SECRET, WORKERS, free_port, prepare_db, stop, wait_http, wrk

sys.path.insert(0, str(ROOT))
from tracker.devstack import _servers  # noqa: E402
from tracker.domain.tokens import UserTokens  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def main() -> int:
    env = dict(os.environ)
    env.setdefault("TRACKER_DATA_DIR", str(ROOT / ".data"))
    _servers(env)
    dsn = asyncio.run(prepare_db(env["TRACKER_DATABASE_URL"]))
    OUT.mkdir(parents=True, exist_ok=True)
    tenv = {**env, "TRACKER_DATABASE_URL": dsn, "TRACKER_SECRET": SECRET, "TRACKER_RATE_LIMIT_IP": "0",
            "TRACKER_RATE_LIMIT_USER": "60", "TRACKER_REDIS_PREFIX": f"trkflood{int(time.time())}:",
            "TRACKER_DATA_DIR": str(OUT / "data")}
    tracker = [sys.executable, "-m", "tracker.cli"]
    subprocess.run([*tracker, "migrate"], env=tenv, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*tracker, "merchants", "sync", str(ROOT / "deploy/merchants.example.yaml")],
                   env=tenv, check=True, stdout=subprocess.DEVNULL)
    signer = UserTokens(SECRET)
    # 20,000 users: each stays far below 60 activations a minute at the rates measured here.
    normal_tokens = OUT / "flood-normal-tokens.txt"
    normal_tokens.write_text("\n".join(signer.mint(f"normal-{i}") for i in range(20_000)) + "\n")
    other_tokens = OUT / "flood-other-tokens.txt"
    other_tokens.write_text("\n".join(signer.mint(f"other-{i}") for i in range(20_000)) + "\n")
    go = str(ROOT / "benchmarks/go.lua")
    flood = str(ROOT / "benchmarks/flood.lua")
    port = free_port()
    log = (OUT / "tracker-flood.log").open("wb")
    proc = subprocess.Popen([*tracker, "serve", "--port", str(port), "--workers", str(WORKERS)],
                            env={**tenv, "TRACKER_DURABILITY": "commit"}, stdout=log, stderr=log)
    rows = []
    try:
        wait_http(port, "/readyz")
        wrk(port, go, {"TOKENS_FILE": str(normal_tokens)}, 2, 16)

        def beside(script: str, wenv: dict[str, str]) -> tuple[dict[str, float], dict[str, float]]:
            other: dict[str, dict[str, float]] = {}
            thread = threading.Thread(target=lambda: other.update(r=wrk(port, script, wenv, SECONDS + 2, 48)))
            thread.start()
            time.sleep(1)
            normal = wrk(port, go, {"TOKENS_FILE": str(normal_tokens)}, SECONDS, 16)
            thread.join()
            return normal, other["r"]

        alone = wrk(port, go, {"TOKENS_FILE": str(normal_tokens)}, SECONDS, 16)
        rows.append(("normal users alone (16 connections)", alone, None))
        normal, flooder = beside(flood, {"FLOOD_TOKEN": signer.mint("flooder")})
        rows.append(("normal users beside a one-user flood (48 connections)", normal, flooder))
        normal, others = beside(go, {"TOKENS_FILE": str(other_tokens)})
        rows.append(("normal users beside 48 connections of other users' clicks", normal, others))
    finally:
        stop(proc)
        log.close()
    print(f"\nwrk {SECONDS}s, {WORKERS} server processes, TRACKER_RATE_LIMIT_USER=60\n")
    print("| scenario | normal req/s | normal p50 ms | normal p99 ms | normal refused | "
          "second load req/s | second load refused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r, second in rows:
        extra = (f"{second['rps']:,.0f} | {second['non_3xx'] / max(second['requests'], 1):.1%}"
                 if second else "- | -")
        print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['non_3xx']} | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
