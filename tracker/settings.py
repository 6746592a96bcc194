"""The frozen settings, read from TRACKER_* variables once and validated at start."""
from __future__ import annotations

import ipaddress
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from .domain.openid import BadOpenIDSetting, OpenIDSettings, load_openid

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The click writer's limits (store/clicks.py takes its defaults from here): clicks a worker holds for
# the writer, and clicks per batch.
QUEUE_LIMIT = 50_000
BATCH_LIMIT = 100
SPOOL_MAX_BYTES = 1 << 30
MIN_ADMIN_KEY = 32


class SettingsError(ValueError):
    """A TRACKER_* variable does not hold a usable value."""


_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
# Redis key prefixes: letters, digits and a few separators (braces are refused with their own reason).
_REDIS_PREFIX = re.compile(r"[A-Za-z0-9:_.\-]{1,64}")


def check_listen(host: str, port: int, workers: int, names: tuple[str, str] = ("--host", "--port")) -> None:
    """The address `tracker serve` listens on: an IP address or a host name, and a port from 1 up
    (0 would be a port the kernel picks, that nothing in front of the service knows)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise SettingsError(f"{names[0]}={host!r} is not an IP address or a host name (such as 0.0.0.0, ::, "
                                "127.0.0.1 or localhost)") from None
    if not 1 <= port <= 65535:
        raise SettingsError(f"{names[1]}={port} is outside 1..65535 (0 is not a port anything could be told)")
    if not 1 <= workers <= 256:
        raise SettingsError(f"--workers={workers} is outside 1..256")


def _server_url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    """A server's URL: one of `schemes`, each host's port a number. Checked here so that a mistake is
    named at start, not met by the first worker as a traceback."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    example = {"postgresql": "postgresql://user:password@host:5432/database",
               "redis": "redis://host:6379/0"}[schemes[0]]
    try:
        parts = urlsplit(raw)
        netloc = parts.netloc.rpartition("@")[2]
        for each in netloc.split(",") if netloc else []:
            port = urlsplit(f"//{each}").port  # ValueError unless a number in 0..65535
            if port == 0:
                raise ValueError("port 0")
    except ValueError as exc:
        raise SettingsError(f"{name} is not a URL such as {example}: {exc}") from None
    if parts.scheme not in schemes:
        raise SettingsError(f"{name} must start with {' or '.join(s + '://' for s in schemes)} (such as {example}), "
                            f"not {parts.scheme + '://' if parts.scheme else 'no scheme'}")
    if parts.scheme in ("redis", "rediss"):
        database = parts.path.strip("/")
        if database and not database.isdigit():
            raise SettingsError(f"{name}: the database after the host is a number (such as {example}), "
                                f"not {database!r}")
    if parts.scheme == "unix" and not parts.path:
        raise SettingsError(f"{name}: a unix:// URL names the socket's path (unix:///run/redis.sock)")
    return raw


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None = None
    redis_url: str | None = None
    # Past one machine (docs/operations.md): `transaction` when database_url is a transaction-pooling
    # PgBouncer; the primary itself for LISTEN and the migrations' lock; a streaming replica for
    # support reads.
    database_pooler: str | None = None
    database_direct_url: str | None = None
    database_replica_url: str | None = None
    data_dir: Path = Path(".data")
    host: str = "127.0.0.1"
    port: int = 8080
    # The service's own public base URL (links printed and shown to people; no trailing slash).
    public_url: str = "http://127.0.0.1:8080"
    workers: int = 1
    secret: str = ""
    # Secret rotation: tokens signed with the previous secret still pass until `previous_until`
    # (UNIX time; None: until the variable is removed).
    secret_previous: str = ""
    secret_previous_until: float | None = None
    admin_key: str = ""
    durability: str = "commit"
    rate_limit_user: int = 60
    rate_limit_ip: int = 1200
    rate_limit_observe_user: int = 600
    rate_limit_delay_ms: int = 250  # a 429 is held this long (see web.common._hold)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Origins (scheme://host[:port]) whose pages may call /v1/observe and the event stream (web/cors.py).
    cors_origins: frozenset[str] = frozenset()
    merchants_file: Path | None = None
    log_format: str = "json"
    # Internal knobs: key prefix so that several deployments or test
    # runs can share one Redis, and the click writer's limits.
    redis_prefix: str = "trk:"
    queue_limit: int = QUEUE_LIMIT
    batch_limit: int = BATCH_LIMIT
    retention_days: int = 400
    # The spool's own cap (bytes over every worker's segments): past it a click PostgreSQL cannot
    # take is refused with 503, before the volume itself fills (or a pod is evicted for it).
    spool_max_bytes: int = SPOOL_MAX_BYTES
    # Wrong admin keys are counted over this many seconds (the contract's 60; tests shorten it).
    key_guess_window: float = 60.0
    # How long a support console sign-in lasts, in seconds (TRACKER_CONSOLE_SESSION_HOURS).
    console_session: int = 8 * 3600
    # Slow clients: a connection that has not sent a whole request head (or idles between
    # requests) this long is closed; a body that has not arrived in `body_timeout` gets 408.
    idle_timeout: int = 15
    body_timeout: int = 10
    # Events out: the outbox's retention (`tracker maintain` prunes older events), and the webhook
    # dispatcher of each worker (`webhooks`: off in processes that should not deliver).
    event_retention_days: int = 30
    # The audit trail's retention (`tracker maintain` deletes older entries), and how long a click's
    # client address is kept whole before `tracker maintain` truncates it (IPv4 /24, IPv6 /48).
    audit_retention_days: int = 400
    ip_retention_days: int = 30
    webhooks: bool = True
    webhook_concurrency: int = 8  # requests in flight per subscriber per worker
    webhook_timeout: int = 10
    webhook_lease: int = 60  # a delivery whose worker died is sent again after this long
    webhook_retry_base_ms: int = 5000  # first retry after 2.5-5 s, doubling up to an hour
    webhook_poll_ms: int = 500
    # The company's OpenID Connect provider for the console's agents (TRACKER_OIDC_*); None: the
    # console signs in with the admin key alone.
    oidc: OpenIDSettings | None = None
    secret_generated: bool = field(default=False, compare=False)

    def with_servers(self, database_url: str, redis_url: str) -> "Settings":
        return replace(self, database_url=database_url, redis_url=redis_url)

    @property
    def direct_url(self) -> str | None:
        """Where a session of its own is needed (LISTEN, the migrations' lock): the primary itself."""
        return self.database_direct_url or self.database_url

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


def _int(env: Mapping[str, str], name: str, default: int, low: int = 0, high: int = 10**9) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is outside {low}..{high}")
    return value


def _instant(env: Mapping[str, str], name: str) -> float | None:
    """An ISO 8601 date or date-time (UTC unless it names a zone) as a UNIX time."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an ISO 8601 date or date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _dev_key(data_dir: Path, name: str) -> str:
    """A key generated once into the data dir, for development set-ups only."""
    try:
        return _kept_key(data_dir, name)
    except OSError as exc:
        raise SettingsError(f"TRACKER_DATA_DIR={str(data_dir)!r} cannot keep the development {name} (set "
                            f"TRACKER_{name.upper()}, or point TRACKER_DATA_DIR at a writable directory): "
                            f"{exc.strerror or exc}") from None


def _kept_key(data_dir: Path, name: str) -> str:
    path = data_dir / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # O_EXCL: two processes starting at once agree on one key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    data_dir = Path(env.get("TRACKER_DATA_DIR") or ".data").absolute()
    durability = env.get("TRACKER_DURABILITY", "commit").strip().lower() or "commit"
    if durability not in ("commit", "async"):
        raise SettingsError(f"TRACKER_DURABILITY={durability!r}: use 'commit' or 'async'")
    log_format = env.get("TRACKER_LOG_FORMAT", "json").strip().lower() or "json"
    if log_format not in ("json", "console"):
        raise SettingsError(f"TRACKER_LOG_FORMAT={log_format!r}: use 'json' or 'console'")
    proxies: list[IPNetwork] = []
    for item in (env.get("TRACKER_TRUSTED_PROXIES") or "").replace(";", ",").split(","):
        if item.strip():
            try:
                proxies.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise SettingsError(f"TRACKER_TRUSTED_PROXIES: {item.strip()!r} is not a CIDR") from None
    secret = env.get("TRACKER_SECRET", "")
    generated = False
    if not secret:
        secret = _dev_key(data_dir, "secret")
        generated = True
    elif len(secret) < 16:
        raise SettingsError("TRACKER_SECRET must be at least 16 characters")
    previous = env.get("TRACKER_SECRET_PREVIOUS", "")
    if previous and len(previous) < 16:
        raise SettingsError("TRACKER_SECRET_PREVIOUS must be at least 16 characters")
    previous_until = _instant(env, "TRACKER_SECRET_PREVIOUS_UNTIL")
    admin_key = env.get("TRACKER_ADMIN_KEY", "") or _dev_key(data_dir, "admin_key")
    if len(admin_key) < MIN_ADMIN_KEY:
        # Ten guesses a minute (web/access.py) only protect a key that cannot be guessed in a
        # lifetime of them: 32 random characters are far past that.
        raise SettingsError(f"TRACKER_ADMIN_KEY must be at least {MIN_ADMIN_KEY} characters (it has "
                            f"{len(admin_key)}): generate one with `python -c 'import secrets; "
                            "print(secrets.token_urlsafe(32))'`")
    merchants = env.get("TRACKER_MERCHANTS")
    webhooks = (env.get("TRACKER_WEBHOOKS") or "on").strip().lower()
    if webhooks not in ("on", "off"):
        raise SettingsError(f"TRACKER_WEBHOOKS={webhooks!r}: use 'on' or 'off'")
    webhook_timeout = _int(env, "TRACKER_WEBHOOK_TIMEOUT", 10, 1, 300)
    webhook_lease = _int(env, "TRACKER_WEBHOOK_LEASE", 60, 2, 3600)
    if webhook_lease <= webhook_timeout:
        raise SettingsError(f"TRACKER_WEBHOOK_LEASE={webhook_lease} must exceed TRACKER_WEBHOOK_TIMEOUT="
                            f"{webhook_timeout}: a delivery still being sent would be sent again")
    host = (env.get("TRACKER_HOST") or "").strip() or "127.0.0.1"
    port = _int(env, "TRACKER_PORT", 8080, 1, 65535)
    check_listen(host, port, 1, ("TRACKER_HOST", "TRACKER_PORT"))
    postgres = ("postgresql", "postgres")
    database_url = _server_url(env, "TRACKER_DATABASE_URL", postgres)
    database_replica_url = _server_url(env, "TRACKER_DATABASE_REPLICA_URL", postgres)
    redis_url = _server_url(env, "TRACKER_REDIS_URL", ("redis", "rediss", "unix"))
    public_url = _public_url(env.get("TRACKER_PUBLIC_URL") or "", host, port)
    pooler = (env.get("TRACKER_DATABASE_POOLER") or "").strip().lower() or None
    if pooler not in (None, "transaction"):
        raise SettingsError(f"TRACKER_DATABASE_POOLER={pooler!r}: use 'transaction' (a PgBouncer in "
                            "transaction pooling mode) or leave it unset")
    direct_url = _server_url(env, "TRACKER_DATABASE_DIRECT_URL", postgres)
    if pooler and not direct_url:
        raise SettingsError("TRACKER_DATABASE_POOLER=transaction needs TRACKER_DATABASE_DIRECT_URL, the "
                            "primary itself: LISTEN and the migrations' lock cannot go through the pooler")
    redis_prefix = env.get("TRACKER_REDIS_PREFIX") or "trk:"
    if "{" in redis_prefix or "}" in redis_prefix:
        raise SettingsError(f"TRACKER_REDIS_PREFIX={redis_prefix!r}: no braces (a Redis Cluster hash tag in the "
                            "prefix would put every key in one slot)")
    if not _REDIS_PREFIX.fullmatch(redis_prefix):
        raise SettingsError(f"TRACKER_REDIS_PREFIX={redis_prefix!r}: 1 to 64 of A-Z a-z 0-9 : _ . - (no spaces "
                            "or other characters)")
    try:
        oidc = load_openid(env)
    except BadOpenIDSetting as exc:
        raise SettingsError(str(exc)) from None
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        database_pooler=pooler,
        database_direct_url=direct_url,
        database_replica_url=database_replica_url,
        data_dir=data_dir,
        host=host,
        port=port,
        public_url=public_url,
        workers=_int(env, "TRACKER_WORKERS", os.cpu_count() or 1, 1, 256),
        secret=secret,
        secret_previous=previous,
        secret_previous_until=previous_until,
        admin_key=admin_key,
        durability=durability,
        rate_limit_user=_int(env, "TRACKER_RATE_LIMIT_USER", 60),
        rate_limit_ip=_int(env, "TRACKER_RATE_LIMIT_IP", 1200),
        rate_limit_observe_user=_int(env, "TRACKER_RATE_LIMIT_OBSERVE_USER", 600),
        rate_limit_delay_ms=_int(env, "TRACKER_RATE_LIMIT_DELAY_MS", 250, 0, 60_000),
        trusted_proxies=tuple(proxies),
        cors_origins=_origins(env.get("TRACKER_CORS_ORIGINS") or ""),
        merchants_file=Path(merchants) if merchants else None,
        log_format=log_format,
        redis_prefix=redis_prefix,
        queue_limit=_int(env, "TRACKER_QUEUE_LIMIT", QUEUE_LIMIT, 100),
        batch_limit=_int(env, "TRACKER_BATCH_LIMIT", BATCH_LIMIT, 1),
        retention_days=_int(env, "TRACKER_RETENTION_DAYS", 400, 1),
        spool_max_bytes=_int(env, "TRACKER_SPOOL_MAX_BYTES", SPOOL_MAX_BYTES, 65536, 1 << 50),
        console_session=_int(env, "TRACKER_CONSOLE_SESSION_HOURS", 8, 1, 24 * 30) * 3600,
        idle_timeout=_int(env, "TRACKER_IDLE_TIMEOUT", 15, 1, 3600),
        body_timeout=_int(env, "TRACKER_BODY_TIMEOUT", 10, 1, 3600),
        event_retention_days=_int(env, "TRACKER_EVENT_RETENTION_DAYS", 30, 1, 3650),
        audit_retention_days=_int(env, "TRACKER_AUDIT_RETENTION_DAYS", 400, 1, 36500),
        ip_retention_days=_int(env, "TRACKER_IP_RETENTION_DAYS", 30, 1, 36500),
        webhooks=webhooks == "on",
        webhook_concurrency=_int(env, "TRACKER_WEBHOOK_CONCURRENCY", 8, 1, 256),
        webhook_timeout=webhook_timeout,
        webhook_lease=webhook_lease,
        webhook_retry_base_ms=_int(env, "TRACKER_WEBHOOK_RETRY_BASE_MS", 5000, 1, 3_600_000),
        webhook_poll_ms=_int(env, "TRACKER_WEBHOOK_POLL_MS", 500, 10, 60_000),
        oidc=oidc,
        secret_generated=generated,
    )


def _public_url(raw: str, host: str, port: int) -> str:
    """TRACKER_PUBLIC_URL, or the listen address as a URL when it is not set."""
    if not raw.strip():
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query \
            or parts.fragment:
        raise SettingsError(f"TRACKER_PUBLIC_URL={raw!r}: an http(s) URL with a host, such as "
                            "https://t.example.com")
    return url


def _origins(raw: str) -> frozenset[str]:
    """TRACKER_CORS_ORIGINS: comma-separated origins, each exactly as a browser sends it in `Origin`
    (scheme, host, a port only when it is not the default): compared as strings, never as patterns."""
    found = set()
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        parts = urlsplit(origin)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.path \
                or parts.query or parts.fragment or port == -1 or "*" in origin:
            raise SettingsError(f"TRACKER_CORS_ORIGINS: {item.strip()!r} is not an origin such as "
                                "https://app.example.com (no path, no wildcard)")
        default = {"http": 80, "https": 443}[parts.scheme]
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        found.add(f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else ""))
    return frozenset(found)


def check_data_dir(path: Path) -> None:
    """TRACKER_DATA_DIR for `tracker serve`: a directory it can write to (the spool is in it), made if
    missing; else a SettingsError naming it, not a traceback from whatever first wrote there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SettingsError(f"TRACKER_DATA_DIR={str(path)!r} is not a directory tracker serve can write to "
                            f"(the spool is kept there): {exc.strerror or exc}") from None


def load_or_exit() -> Settings:
    try:
        return load()
    except SettingsError as exc:
        print(f"tracker: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def censor_dsn(url: str | None) -> str:
    """The DSN with its password replaced, for logs."""
    if not url:
        return ""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
