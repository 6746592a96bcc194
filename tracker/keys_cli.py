"""`tracker keys create NAME --scope S … | list | revoke NAME`: keys for machines. A new key is
printed once, as JSON; only its hash is stored, and no other command ever shows it."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime

from .settings import Settings


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from .domain.access import SCOPES

    p_keys = sub.add_parser("keys", help="keys for machines, each with its scopes")
    p_sub = p_keys.add_subparsers(dest="action", required=True)
    p_create = p_sub.add_parser("create", help="create a key and print it once, as JSON")
    p_create.add_argument("name")
    p_create.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                          help="one of: " + ", ".join(SCOPES) + " (repeat for more)")
    p_sub.add_parser("list", help="the live keys, as JSON (never the keys themselves)")
    p_revoke = p_sub.add_parser("revoke", help="revoke a key: refused at once everywhere")
    p_revoke.add_argument("name")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    from .domain.access import BadKeyRequest, check_key_request
    from .store import api_keys
    from .store.db import connect, connect_options

    if args.action == "create":
        try:
            name, scopes = check_key_request(args.name, args.scope)
        except BadKeyRequest as exc:
            print(f"tracker: {exc}", file=sys.stderr)
            return 2
    # TimeZone is one of the startup parameters a transaction pooler tracks per client.
    conn = await connect(settings.database_url, server_settings={"TimeZone": "UTC"},
                                 **connect_options(settings.database_pooler))
    try:
        if args.action == "create":
            try:
                key = await api_keys.create(conn, name, scopes)
            except api_keys.KeyNameTaken as exc:
                print(f"tracker: {exc}", file=sys.stderr)
                return 1
            print(json.dumps({"name": name, "scopes": scopes, "key": key}))
            return 0
        if args.action == "list":
            print(json.dumps([{"name": k["name"], "scopes": k["scopes"], "created_at": _iso(k["created_at"]),
                               "last_used_at": _iso(k["last_used_at"])} for k in await api_keys.listed(conn)],
                             indent=2))
            return 0
        if not await api_keys.revoke(conn, args.name):
            print(f"tracker: no live key named {args.name!r} (see `tracker keys list`)", file=sys.stderr)
            return 1
        print(json.dumps({"revoked": args.name}))
        return 0
    finally:
        await conn.close()


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))
