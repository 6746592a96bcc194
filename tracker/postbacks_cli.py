"""`tracker postbacks orphans|reconcile`: support's tools for postbacks whose click was unknown."""
from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING, Any, Mapping

from .settings import Settings

if TYPE_CHECKING:
    from .domain.conversions import Postback


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if hasattr(value, "isoformat"):
            value = value.isoformat()
        out[key] = value
    return out


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    from .cli import connect
    from .domain.conversions import read_raw
    from .store.conversions import list_orphans, reconcile
    from .store.merchants import load

    conn = await connect(settings)
    try:
        if args.action == "orphans":
            for row in await list_orphans(conn, args.limit):
                print(json.dumps(_jsonable(row), ensure_ascii=False))
            return 0
        merchants, networks = await load(conn)

        def read(network: str, raw: Mapping[str, Any]) -> Postback | None:
            net = networks.get(network)
            return read_raw(net, raw) if net else None

        attached = await reconcile(conn, read, merchants.get)
        for item in attached:
            print(json.dumps(item))
        print(json.dumps({"reconciled": len(attached)}))
        return 0
    finally:
        await conn.close()


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))
