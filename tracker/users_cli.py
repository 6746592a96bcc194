"""`tracker users erase USER_ID`: the erasure of DELETE /v1/users/{user_id}, from the command line.
Audited as `cli:<login name>`; the running workers sweep what they still held on its NOTIFY."""
from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys

from .settings import Settings


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p_users = sub.add_parser("users", help="a user's personal data")
    p_sub = p_users.add_subparsers(dest="action", required=True)
    p_erase = p_sub.add_parser("erase", help="erase a user's personal data everywhere tracker keeps it")
    p_erase.add_argument("user_id")


def actor() -> str:
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (a container)
        return "cli"


async def _erase(settings: Settings, user_id: str) -> tuple[dict[str, object], str | None]:
    """The erasure's answer, and why the user's sessions in Redis are still there (None: deleted)."""
    from redis.exceptions import RedisError

    from .store import audit
    from .store.db import connect, connect_options
    from .store.erasure import announce, erase
    from .store.redis_client import open_client
    from .store.sessions import SessionStore

    conn = await connect(settings.database_url, **connect_options(settings.database_pooler))
    client, _ = await open_client(settings.redis_url or "", max_connections=4, name="tracker-erase")
    left = None
    try:
        await audit.record(conn, [audit.Entry(actor(), "user.erase", None, user_id)])
        done = await erase(conn, user_id)
        try:
            done.sessions = await SessionStore(client, settings.redis_prefix).forget(done.click_ids)
        except (RedisError, OSError) as exc:  # PostgreSQL's part is done; a repeat deletes the sessions
            left = f"{type(exc).__name__}: {str(exc)[:200]}"
        assert done.before is not None
        await announce(conn, user_id, done.before)  # the workers sweep what they still held
    finally:
        await conn.close()
        await client.aclose()
    return {"user_id": user_id, "erased": done.counts()}, left


def run(settings: Settings, args: argparse.Namespace) -> int:
    from .domain.tokens import USER_ID

    if not USER_ID.fullmatch(args.user_id):
        print("tracker: a user id is 1-64 characters of A-Z a-z 0-9 _ @ : . -", file=sys.stderr)
        return 2
    answer, left = asyncio.run(_erase(settings, args.user_id))
    print(json.dumps(answer))
    if left is not None:
        print(f"tracker: the user's data in PostgreSQL is erased, but Redis could not be reached to delete "
              f"their sessions ({left}): run the command again once Redis is back", file=sys.stderr)
        return 1
    return 0
