"""Merchants and networks in PostgreSQL: sync from the file in one transaction, load, and a live
in-memory cache per worker (MerchantCache) that reloads on NOTIFY."""
from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import structlog

from .. import metrics
from ..domain.backoff import Backoff
from ..domain.merchants import Merchant, MerchantsFile
from ..domain.networks import Network
from .db import at_start, connect
from .tasks import cancel_and_wait, supervised

CHANNEL = "tracker_merchants"
log = structlog.get_logger("tracker.merchants")

_MERCHANT_COLS = ("slug, name, network, partner_url, default_target, allowed_hosts, user_share, "
                  "session_ttl_s, confirmation_window_s, own_promo_codes, app_url, excluded_stores, active, "
                  "network_offer_ids")


def _merchant_row(m: Merchant) -> tuple[Any, ...]:
    return (m.slug, m.name, m.network, m.partner_url, m.default_target, sorted(m.allowed_hosts),
            m.user_share, m.session_ttl, m.confirmation_window, sorted(m.own_promo_codes), m.app_url,
            sorted(m.excluded_stores), m.active, sorted(m.network_offer_ids))


def _network_row(n: Network) -> tuple[Any, ...]:
    return (n.name, n.profile, n.token, n.hmac_secret, list(n.allow_ips), True)


async def sync(conn: asyncpg.Connection, file: MerchantsFile) -> dict[str, list[str]]:
    """Make the tables match the file in one transaction. Merchants and networks missing from the
    file are deactivated, not deleted: clicks and conversions still name them."""
    report: dict[str, list[str]] = {"added": [], "changed": [], "deactivated": [], "unchanged": []}
    async with conn.transaction():
        await conn.execute("LOCK TABLE merchants, networks, webhooks IN SHARE ROW EXCLUSIVE MODE")
        old_n = {r["name"]: tuple(r.values()) for r in await conn.fetch(
            "SELECT name, profile, token, hmac_secret, allow_ips, active FROM networks")}
        for n in file.networks:
            row = _network_row(n)
            if old_n.get(n.name) != row:
                await conn.execute(
                    "INSERT INTO networks (name, profile, token, hmac_secret, allow_ips, active) "
                    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO UPDATE SET "
                    "profile = $2, token = $3, hmac_secret = $4, allow_ips = $5, active = $6, "
                    "updated_at = now()", *row)
                report["added" if n.name not in old_n else "changed"].append(f"network {n.name}")
        names = [n.name for n in file.networks]
        for r in await conn.fetch(
                "UPDATE networks SET active = false, updated_at = now() "
                "WHERE active AND NOT (name = ANY($1::text[])) RETURNING name", names):
            report["deactivated"].append(f"network {r['name']}")
        old_m = {r["slug"]: tuple(r.values()) for r in await conn.fetch(
            f"SELECT {_MERCHANT_COLS} FROM merchants")}
        for m in file.merchants:
            row = _merchant_row(m)
            old = old_m.get(m.slug)
            if old is not None and _same(old, row):
                report["unchanged"].append(m.slug)
                continue
            await conn.execute(
                f"INSERT INTO merchants ({_MERCHANT_COLS}) VALUES "
                "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) ON CONFLICT (slug) DO UPDATE SET "
                "name = $2, network = $3, partner_url = $4, default_target = $5, allowed_hosts = $6, "
                "user_share = $7, session_ttl_s = $8, confirmation_window_s = $9, own_promo_codes = $10, "
                "app_url = $11, excluded_stores = $12, active = $13, network_offer_ids = $14, "
                "updated_at = now()", *row)
            report["added" if old is None else "changed"].append(m.slug)
        slugs = [m.slug for m in file.merchants]
        for r in await conn.fetch(
                "UPDATE merchants SET active = false, updated_at = now() "
                "WHERE active AND NOT (slug = ANY($1::text[])) RETURNING slug", slugs):
            report["deactivated"].append(r["slug"])
        await sync_webhooks(conn, file, report)
        if report["added"] or report["changed"] or report["deactivated"]:
            # Delivered at commit, to every worker of every pod listening.
            await conn.execute(f"NOTIFY {CHANNEL}")
    return report


async def sync_webhooks(conn: asyncpg.Connection, file: MerchantsFile, report: dict[str, list[str]]) -> None:
    """The webhooks table as the file says (within sync's transaction). A subscriber missing from the
    file is deactivated: its deliveries stay, unsent, until it comes back."""
    old = {r["name"]: tuple(r.values()) for r in await conn.fetch(
        "SELECT name, url, secret, types, active FROM webhooks")}
    for w in file.webhooks:
        row = (w.name, w.url, w.secret, list(w.types) if w.types is not None else None, True)
        if old.get(w.name) == row:
            continue
        await conn.execute(
            "INSERT INTO webhooks (name, url, secret, types, active) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (name) DO UPDATE SET url = $2, secret = $3, types = $4, active = $5, "
            "updated_at = now()", *row)
        report["added" if w.name not in old else "changed"].append(f"webhook {w.name}")
    for r in await conn.fetch(
            "UPDATE webhooks SET active = false, updated_at = now() "
            "WHERE active AND NOT (name = ANY($1::text[])) RETURNING name", [w.name for w in file.webhooks]):
        report["deactivated"].append(f"webhook {r['name']}")


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return all((Decimal(a) == Decimal(b)) if isinstance(a, Decimal) else
               (sorted(a) == sorted(b) if isinstance(a, list) else a == b)
               for a, b in zip(old, new))


async def load(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[dict[str, Merchant], dict[str, Network]]:
    merchants = {}
    for r in await conn.fetch(f"SELECT {_MERCHANT_COLS} FROM merchants"):
        merchants[r["slug"]] = Merchant(
            slug=r["slug"], name=r["name"], network=r["network"], partner_url=r["partner_url"],
            default_target=r["default_target"], allowed_hosts=frozenset(r["allowed_hosts"]),
            user_share=r["user_share"], session_ttl=r["session_ttl_s"],
            confirmation_window=r["confirmation_window_s"],
            own_promo_codes=frozenset(r["own_promo_codes"]), app_url=r["app_url"],
            excluded_stores=frozenset(r["excluded_stores"]), active=r["active"],
            network_offer_ids=frozenset(r["network_offer_ids"]))
    networks = {}
    for r in await conn.fetch(
            "SELECT name, profile, token, hmac_secret, allow_ips FROM networks WHERE active"):
        networks[r["name"]] = Network(name=r["name"], profile=r["profile"], token=r["token"],
                                      hmac_secret=r["hmac_secret"], allow_ips=tuple(r["allow_ips"]))
    return merchants, networks


class MerchantCache:
    """This worker's copy of merchants and networks. Reloaded when a sync NOTIFYs, and every
    `refresh` seconds in case a notification was missed while the listening connection was down."""

    def __init__(self, dsn: str, pool: asyncpg.Pool, refresh: float = 30.0) -> None:
        self._dsn, self._pool, self._refresh = dsn, pool, refresh
        self.merchants: dict[str, Merchant] = {}
        self.networks: dict[str, Network] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def reload(self) -> None:
        self.merchants, self.networks = await load(self._pool)
        metrics.prime_merchants(self.merchants, self.networks)

    async def start(self) -> None:
        # The worker's start waited for PostgreSQL already; a blip right after is waited out too (as
        # at start), rather than failing this worker's boot and with it the whole server.
        await at_start(self._dsn, self.reload)
        self._task = supervised("merchant-listener", self._listen)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        reconnect = Backoff(first=1.0, cap=10.0)
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn)
                await conn.add_listener(CHANNEL, self._notified)
                await self.reload()  # anything that changed while we were not listening
                reconnect.reset()
                while not conn.is_closed():
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._refresh)
                    except TimeoutError:
                        pass
                    self._wake.clear()
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving from memory, retry
                log.warning("merchant_listener_down", error=str(exc))
                await asyncio.sleep(reconnect.next())
            finally:
                if conn is not None:
                    try:
                        await asyncio.wait_for(conn.close(), 2)
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        conn.terminate()
