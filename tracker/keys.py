"""Every piece of application state, as typed aiohttp AppKeys."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
from aiohttp import web

from .domain.console_session import ConsoleKeys
from .domain.detection import Detector
from .domain.openid import FlowKeys
from .domain.tokens import UserTokens
from .settings import Settings
from .store.clicks import ClickWriter
from .store.delivery import Dispatcher
from .store.erasure_watch import ErasureWatch
from .store.feed import StateFeed
from .store.key_guard import KeyGuard
from .store.merchants import MerchantCache
from .store.openid import Provider
from .store.replica import SupportReads
from .store.sessions import SessionStore
from .store.signals import SignalWriter
from .tally_peers import TallyPeers


@dataclass(slots=True)
class OpenStreams:
    """The event streams open on this worker (web/events.py bounds them): per user, and in all."""
    per_user: dict[str, int] = field(default_factory=dict)
    total: int = 0


@dataclass(slots=True)
class HeldAnswers:
    """How many rate-limited answers this worker is holding back right now (web/common.py)."""
    count: int = 0


SETTINGS = web.AppKey("settings", Settings)
TOKENS = web.AppKey("tokens", UserTokens)
POOL = web.AppKey("pool", asyncpg.Pool)
READS = web.AppKey("reads", SupportReads)  # support reads: the replica when there is one
MERCHANTS = web.AppKey("merchants", MerchantCache)
WRITER = web.AppKey("writer", ClickWriter)
# Only under `tracker serve` (several workers): flushes every worker's tally before a scrape.
TALLY_PEERS = web.AppKey("tally_peers", TallyPeers)
SESSIONS = web.AppKey("sessions", SessionStore)
FEED = web.AppKey("feed", StateFeed)
SIGNALS = web.AppKey("signals", SignalWriter)
DETECTOR = web.AppKey("detector", Detector)
CLOSING = web.AppKey("closing", asyncio.Event)
CONSOLE = web.AppKey("console", ConsoleKeys)
KEY_GUARD = web.AppKey("key_guard", KeyGuard)
WEBHOOKS = web.AppKey("webhooks", Dispatcher)
STREAMS = web.AppKey("streams", OpenStreams)
HELD = web.AppKey("held", HeldAnswers)
ERASURES = web.AppKey("erasures", ErasureWatch)
# The company's OpenID Connect provider and the sign-in flow's cookie keys: only with TRACKER_OIDC_ISSUER.
OPENID = web.AppKey("openid", Provider)
OPENID_FLOWS = web.AppKey("openid_flows", FlowKeys)
