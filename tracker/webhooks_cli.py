"""`tracker webhooks status|retry NAME`: operators' view of webhook deliveries. Secrets never
appear: URLs are shown without their query, secrets not at all."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .settings import Settings


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    from .cli import connect
    from .store.webhooks import retry_failed, status

    conn = await connect(settings)
    try:
        if args.action == "status":
            print(json.dumps({"webhooks": await status(conn)}, indent=2))
            return 0
        requeued = await retry_failed(conn, args.name)
        if requeued is None:
            print(f"tracker: no webhook named {args.name!r} (see `tracker webhooks status`)", file=sys.stderr)
            return 1
        print(json.dumps({"webhook": args.name, "requeued": requeued}))
        return 0
    finally:
        await conn.close()


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))
