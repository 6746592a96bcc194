"""structlog, configured once: JSON lines (orjson, bytes) on stdout, context vars merged first."""
from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import Any

import orjson
import structlog


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Secrets never reach a log line, whatever a caller passes.
    for key in ("token", "secret", "hmac_secret", "password", "authorization", "u", "admin_key"):
        if key in event:
            event[key] = "***"
    return event


_format = "json"  # the last configured


def configure(fmt: str = "json", level: int = logging.INFO) -> None:
    global _format
    _format = fmt
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.format_exc_info,
    ]
    if fmt == "console":
        renderer: structlog.types.Processor = structlog.dev.ConsoleRenderer(colors=False)
        factory: structlog.types.WrappedLogger = structlog.PrintLoggerFactory(sys.stdout)
        text_renderer = renderer
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
        text_renderer = structlog.processors.JSONRenderer(serializer=lambda obj, **_: orjson.dumps(obj).decode())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # The libraries' own loggers (asyncpg, redis, aiohttp, asyncio) go the same way: one JSON line
    # on stdout each, redacted like ours, instead of plain text on stderr.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=text_renderer, foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


def say(event: str, text: str, level: str = "error", **fields: Any) -> None:
    """A line for whoever runs a command, on stderr: `tracker: <text>` in the console format; with
    the JSON format a JSON line like the log's (`event`, `message`: the text, and `fields`), so that
    every line a command writes parses as JSON."""
    if _format == "json":
        doc = {**fields, "event": event, "message": text, "level": level,
               "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
        line = orjson.dumps(_redact(None, level, doc)).decode()
    else:
        line = f"tracker: {text}"
    print(line, file=sys.stderr, flush=True)
