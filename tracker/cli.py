"""The `tracker` command: serve, migrate, merchants sync, token, maintain, postbacks, webhooks, keys, users."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import Settings, SettingsError, censor_dsn, check_data_dir, check_listen, load_or_exit

if TYPE_CHECKING:
    import asyncpg


def resolve_servers(settings: Settings) -> Settings:
    """Use the variables' servers when set; else start (or find running) the embedded ones."""
    if settings.database_url and settings.redis_url:
        return settings
    from . import embedded

    try:
        servers = embedded.start(settings.data_dir)
    except embedded.EmbeddedMissing as exc:
        print(f"tracker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings.with_servers(settings.database_url or servers.database_url,
                                 settings.redis_url or servers.redis_url)


# -- database commands -----------------------------------------------------------------------------
async def connect(settings: Settings) -> asyncpg.Connection:
    """A connection to TRACKER_DATABASE_URL, fit for a transaction pooler when there is one."""
    from .store.db import connect, connect_options

    return await connect(settings.database_url, **connect_options(settings.database_pooler))


async def _migrate(settings: Settings) -> list[str]:
    from .store.db import connect, ensure_near_partitions, migrate

    # The migrations' lock is a session's: on the primary itself, never through a transaction pooler
    # (there two pods both "held" it).
    conn = await connect(settings.direct_url)
    try:
        applied = await migrate(conn)
        await ensure_near_partitions(conn)
    finally:
        await conn.close()
    return applied


def _read_merchants_file(path: Path) -> Any:
    import yaml

    from .domain.merchants import MerchantsFileError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise MerchantsFileError([f"{path}: cannot read: {exc}"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MerchantsFileError([f"{path}: not valid YAML: {exc}"]) from None


async def sync_merchants_file(settings: Settings, path: Path, wait: float = 0.0) -> dict[str, list[str]]:
    """Make the merchants table match `path`; `wait`: seconds to wait for PostgreSQL (at start)."""
    from .domain.merchants import parse_merchants_file
    from .domain.profiles import profile_names
    from .store.db import at_start
    from .store.merchants import sync

    parsed = parse_merchants_file(_read_merchants_file(path), profile_names())
    conn = await (at_start(settings.database_url or "", lambda: connect(settings), wait) if wait
                  else connect(settings))
    try:
        report = await sync(conn, parsed)
        report["warnings"] = list(parsed.warnings)
        return report
    finally:
        await conn.close()


async def _maintain(settings: Settings, ahead: int) -> dict[str, Any]:
    from datetime import datetime, timedelta, timezone

    from .store.addresses import truncate_addresses
    from .store.db import drop_old_partitions, ensure_partitions
    from .store.erasure import sweep_erasures
    from .store.retention import prune

    conn = await connect(settings)
    try:
        today = datetime.now(timezone.utc).date()
        created = await ensure_partitions(conn, today - timedelta(days=1), ahead + 2)
        dropped = await drop_old_partitions(conn, settings.retention_days, today)
        pruned = await prune(conn, settings, today)
        swept = await sweep_erasures(conn)
        truncated = await truncate_addresses(conn, settings.ip_retention_days, today)
    finally:
        await conn.close()
    return {"created": created, "dropped": dropped, "pruned": pruned, "erasures_swept": swept,
            "addresses_truncated": truncated}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve HTTP on all cores")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_serve.add_argument("--workers", type=int)
    sub.add_parser("migrate", help="apply the migrations shipped in the package (tracker/sql)")
    p_m = sub.add_parser("merchants", help="merchants file commands")
    p_m_sub = p_m.add_subparsers(dest="action", required=True)
    p_sync = p_m_sub.add_parser("sync", help="make the merchants table match FILE")
    p_sync.add_argument("file", type=Path)
    p_token = sub.add_parser("token", help="print a signed user token")
    p_token.add_argument("user_id")
    p_maint = sub.add_parser("maintain", help="create upcoming partitions, drop expired ones, prune rows past retention")
    p_maint.add_argument("--days-ahead", type=int, default=14)
    p_pb = sub.add_parser("postbacks", help="orphan postbacks")
    p_pb_sub = p_pb.add_subparsers(dest="action", required=True)
    p_orph = p_pb_sub.add_parser("orphans", help="list postbacks whose click is unknown")
    p_orph.add_argument("--limit", type=int, default=100)
    p_pb_sub.add_parser("reconcile", help="attach orphans whose click has arrived since")
    p_wh = sub.add_parser("webhooks", help="webhook deliveries")
    p_wh_sub = p_wh.add_subparsers(dest="action", required=True)
    p_wh_sub.add_parser("status", help="each subscriber's backlog and failures, as JSON")
    p_retry = p_wh_sub.add_parser("retry", help="send a subscriber's failed deliveries again")
    p_retry.add_argument("name")
    from . import keys_cli, users_cli

    keys_cli.add_parser(sub)
    users_cli.add_parser(sub)
    args = parser.parse_args(argv)

    settings = load_or_exit()
    if args.command == "token":
        from .domain.tokens import InvalidUserId, UserTokens

        try:
            print(UserTokens(settings.secret).mint(args.user_id))
        except InvalidUserId as exc:
            print(f"tracker: {exc}", file=sys.stderr)
            return 2
        if settings.secret_generated:  # a token production would refuse: never handed out silently
            print(f"tracker: warning: TRACKER_SECRET is not set; this token is signed with the development "
                  f"secret in {settings.data_dir / 'secret'}", file=sys.stderr)
        return 0

    if args.command == "serve":
        host = args.host or settings.host
        port = settings.port if args.port is None else args.port
        workers = settings.workers if args.workers is None else args.workers
        try:
            check_listen(host, port, workers)
            check_data_dir(settings.data_dir)
        except SettingsError as exc:
            print(f"tracker: bad setting: {exc}", file=sys.stderr)
            return 2
    settings = resolve_servers(settings)
    if args.command == "serve":
        from . import logs

        logs.configure(settings.log_format)  # what serve says goes the log's way (JSON lines with json)
        if settings.merchants_file:
            from .domain.merchants import MerchantsFileError
            from .store.db import START_WAIT, StartFailed

            try:
                report = asyncio.run(sync_merchants_file(settings, settings.merchants_file, START_WAIT))
            except MerchantsFileError as exc:
                logs.say("merchants_file_invalid", f"TRACKER_MERCHANTS={settings.merchants_file} does not validate:"
                         "\n  - " + "\n  - ".join(exc.problems), problems=exc.problems)
                return 1
            except StartFailed as exc:
                logs.say("merchants_sync_failed", f"cannot sync TRACKER_MERCHANTS at start: {exc}")
                return 1
            logs.say("merchants_synced", f"merchants synced: {json.dumps(report)}", level="info", report=report)
        from .serve import serve

        return serve(settings, host, port, workers)
    try:
        return _database_command(settings, args)
    except _unreachable() as exc:
        dsn = settings.direct_url if args.command == "migrate" else settings.database_url
        print(f"tracker: cannot use PostgreSQL at {censor_dsn(dsn)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _unreachable() -> tuple[type[BaseException], ...]:
    """What connecting to PostgreSQL raises when it cannot be reached or refuses tracker."""
    import asyncpg

    return (OSError, asyncpg.PostgresConnectionError, asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError, asyncpg.CannotConnectNowError,
            asyncpg.TooManyConnectionsError)


def _database_command(settings: Settings, args: argparse.Namespace) -> int:
    """The commands that use PostgreSQL (all but serve and token)."""
    from . import keys_cli, users_cli

    if args.command == "migrate":
        from .store.db import MigrationsError

        try:
            applied = asyncio.run(_migrate(settings))
        except MigrationsError as exc:
            print(f"tracker: {exc}; nothing was applied (the package ships them in tracker/sql; "
                  "TRACKER_SQL_DIR, when set, must name a directory that holds them)", file=sys.stderr)
            return 1
        print(json.dumps({"applied": applied}))
        return 0
    if args.command == "merchants":
        from .domain.merchants import MerchantsFileError

        try:
            report = asyncio.run(sync_merchants_file(settings, args.file))
        except MerchantsFileError as exc:
            print(f"tracker: {args.file} was not applied; nothing changed:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 1
        print(json.dumps(report))
        return 0
    if args.command == "maintain":
        print(json.dumps(asyncio.run(_maintain(settings, args.days_ahead))))
        return 0
    if args.command == "postbacks":
        from . import postbacks_cli

        return postbacks_cli.run(settings, args)
    if args.command == "webhooks":
        from . import webhooks_cli

        return webhooks_cli.run(settings, args)
    if args.command == "keys":
        return keys_cli.run(settings, args)
    if args.command == "users":
        return users_cli.run(settings, args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
