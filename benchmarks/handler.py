"""The /go handler's own CPU per request, without sockets, PostgreSQL or Redis: the real handler
(`answer(activate_in(...))`) over 15,000 fresh requests built by aiohttp's make_mocked_request, with
the real token signer, merchants (deploy/merchants.example.yaml), rate limits, session store and
click writer (async mode; nothing is flushed). Repeatable to a few percent, unlike wrk on a shared
machine, so it shows a handler change that wrk's noise hides.

    .venv/bin/python benchmarks/handler.py            # best of 5 rounds of 2,000 requests
    .venv/bin/python benchmarks/handler.py --lines    # line_profiler (pip install line_profiler)
    .venv/bin/python benchmarks/handler.py --instructions   # callgrind: instructions per request
                                                           # over the 10,000 measured requests
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import uvloop
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracker import keys, settings  # noqa: E402
from tracker.domain import targets  # noqa: E402
from tracker.domain.merchants import parse_merchants_file  # noqa: E402
from tracker.domain.profiles import profile_names  # noqa: E402
from tracker.domain.tokens import UserTokens  # noqa: E402
from tracker.store.clicks import ClickWriter  # noqa: E402
from tracker.store.sessions import SessionStore  # noqa: E402
from tracker.web.activation import activate_in  # noqa: E402
from tracker.web.common import answer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"


async def main(profiler: object | None) -> None:
    data_dir = tempfile.mkdtemp(prefix="tracker-handler-")
    config = settings.load({**os.environ, "TRACKER_SECRET": "bench-secret-0123456789abcdef",
                            "TRACKER_DATA_DIR": data_dir, "TRACKER_RATE_LIMIT_USER": "100000",
                            "TRACKER_RATE_LIMIT_IP": "1000000000"})
    app = web.Application()
    app[keys.SETTINGS] = config
    app[keys.TOKENS] = UserTokens(config.secret)
    merchants = parse_merchants_file(yaml.safe_load((ROOT / "deploy/merchants.example.yaml").read_text()),
                                     profile_names())
    app[keys.MERCHANTS] = types.SimpleNamespace(merchants={m.slug: m for m in merchants.merchants})
    sessions = app[keys.SESSIONS] = SessionStore(None, "bench:")  # type: ignore[arg-type]
    app[keys.WRITER] = ClickWriter(None, None, durability="async", queue_limit=10**9)  # type: ignore[arg-type]
    tokens = [app[keys.TOKENS].mint(f"bench-{i}") for i in range(5000)]
    requests = [make_mocked_request("GET", f"/go/aliexpress?u={tokens[i % 5000]}&to=https%3A%2F%2Faliexpress.ru"
                                           f"%2Fitem%2F{i}.html", headers={"User-Agent": UA})
                for i in range(15_000)]
    for request in requests[:5000]:  # warm-up: every token verified once, as in benchmarks/go.lua
        response = await answer(app, request, "go", activate_in(app, request, "aliexpress"))
        assert response.status == 302, response.text
    best = float("inf")
    cg = None
    if os.environ.get("BENCH_CALLGRIND_LIB"):
        import ctypes

        cg = ctypes.CDLL(os.environ["BENCH_CALLGRIND_LIB"])
        cg.cg_start()
    for round_ in range(5):
        batch = requests[5000 + 2000 * round_:5000 + 2000 * (round_ + 1)]
        if profiler is not None:
            profiler.enable()  # type: ignore[attr-defined]
        started = time.process_time()
        for request in batch:
            await answer(app, request, "go", activate_in(app, request, "aliexpress"))
        best = min(best, (time.process_time() - started) / len(batch) * 1e6)
        if profiler is not None:
            profiler.disable()  # type: ignore[attr-defined]
        sessions._ops.clear()
    if cg is not None:
        cg.cg_stop()
    print(f"/go handler: {best:.2f} us of CPU per request (best of 5 rounds of 2,000 fresh requests)")


def instructions() -> int:
    """Run this benchmark under callgrind, counting the measured requests only."""
    import re
    import subprocess

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from inprocess import callgrind_lib

    scratch = Path(tempfile.mkdtemp(prefix="tracker-handler-"))
    out = scratch / "callgrind"
    subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
                    sys.executable, __file__], check=True, stderr=subprocess.DEVNULL,
                   env={**os.environ, "BENCH_CALLGRIND_LIB": str(callgrind_lib(scratch)), "PYTHONHASHSEED": "0"})
    total = sum(int(m.group(1)) for d in scratch.glob("callgrind.*")
                for m in re.finditer(r"^totals: (\d+)", d.read_text(errors="replace"), re.M))
    print(f"/go handler: {total / 10_000:,.0f} instructions per request (10,000 requests, callgrind)")
    return 0


if __name__ == "__main__":
    if "--instructions" in sys.argv:
        sys.exit(instructions())
    uvloop.install()
    line_profiler = None
    if "--lines" in sys.argv:
        from line_profiler import LineProfiler

        line_profiler = LineProfiler(activate_in, answer, targets.check_target)
    asyncio.run(main(line_profiler))
    if line_profiler is not None:
        line_profiler.print_stats(output_unit=1e-6)
