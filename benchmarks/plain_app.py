"""The ceiling: a plain aiohttp app answering 302, run the same way as tracker (uvloop, reuse_port,
N processes, no access log).

    plain_app.py PORT WORKERS [commit|async DSN]

With a durability and a DSN, each 302 also hands a Click to tracker's ClickWriter (as /go does,
and nothing else: no token, target, rate limit, Redis or metrics): the floor that storing clicks
alone sets on this machine, measured by benchmarks/run beside the ceiling."""
import os
import sys
import tempfile
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def go(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "https://example.com/",
                                             "Cache-Control": "no-store"})


def serve(port: int, durability: str | None, dsn: str | None) -> None:
    uvloop.install()
    app = web.Application()
    if durability and dsn:
        from tracker.domain.clickid import new_click_id
        from tracker.store.clicks import Click, ClickWriter
        from tracker.store.db import create_pool
        from tracker.store.spool import Spool

        async def writer_ctx(app: web.Application):  # type: ignore[no-untyped-def]
            pool = await create_pool(dsn)
            with tempfile.TemporaryDirectory() as tmp:
                writer = ClickWriter(pool, Spool(Path(tmp) / "spool"), durability=durability, dsn=dsn)
                await writer.start()
                app["writer"] = writer
                yield
                await writer.close()
            await pool.close()

        async def go_stored(request: web.Request) -> web.Response:
            click_id, ms = new_click_id()
            await request.app["writer"].write(Click(click_id, ms, "floor", "aliexpress", "web", "https://example.com/",
                                                    None, request.remote, "wrk", False, "GET"))
            return web.Response(status=302, headers={"Location": "https://example.com/",
                                                     "Cache-Control": "no-store", "X-Click-Id": click_id})

        app.cleanup_ctx.append(writer_ctx)
        app.router.add_get("/go/{merchant}", go_stored)
    else:
        app.router.add_get("/go/{merchant}", go)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, access_log=None, print=None)


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    durability, dsn = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else (None, None)
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            serve(port, durability, dsn)
            os._exit(0)
        pids.append(pid)
    import signal

    def stop(signum: int, _: object) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for pid in pids:
        os.waitpid(pid, 0)
