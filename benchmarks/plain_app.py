"""The ceiling: a plain aiohttp app answering 302, run the same way as tracker (uvloop, reuse_port,
N processes, no access log)."""
import os
import sys

import uvloop
from aiohttp import web


async def go(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "https://example.com/",
                                             "Cache-Control": "no-store"})


def serve(port: int) -> None:
    uvloop.install()
    app = web.Application()
    app.router.add_get("/go/{merchant}", go)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, access_log=None, print=None)


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            serve(port)
            os._exit(0)
        pids.append(pid)
    import signal

    def stop(signum: int, _: object) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for pid in pids:
        os.waitpid(pid, 0)
