"""Waiting for what the service does by itself (a batch written, a channel subscribed, a server up):
poll a condition until a deadline and fail naming what never happened, instead of sleeping a fixed
time and hoping it is done by then. The deadlines are guards against hanging, not timed assertions."""
from __future__ import annotations

import asyncio
import inspect
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any, Awaitable, Callable, TypeVar, overload

import aiohttp

T = TypeVar("T")
EVERY = 0.02  # seconds between two looks


def _never(what: str, seconds: float, last: Any) -> AssertionError:
    seen = repr(last)
    return AssertionError(f"never happened within {seconds:g} s: {what} (last seen: "
                          f"{seen[:300] + '...' if len(seen) > 300 else seen})")


@overload
async def until(check: Callable[[], Awaitable[T | None]], what: str, seconds: float = 20.0,
                ignoring: tuple[type[BaseException], ...] = ()) -> T: ...
@overload
async def until(check: Callable[[], T | None], what: str, seconds: float = 20.0,
                ignoring: tuple[type[BaseException], ...] = ()) -> T: ...
async def until(check: Callable[[], Any], what: str, seconds: float = 20.0,
                ignoring: tuple[type[BaseException], ...] = ()) -> Any:
    """`check()`'s first true answer (`check` may be a coroutine function). An exception of a type in
    `ignoring` counts as "not yet"; nothing true within `seconds` is an AssertionError naming `what`."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while True:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except ignoring as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise _never(what, seconds, last)
        await asyncio.sleep(EVERY)


def until_blocking(check: Callable[[], T | None], what: str, seconds: float = 20.0,
                   ignoring: tuple[type[BaseException], ...] = (),
                   pause: Callable[[float], object] = time.sleep) -> T:
    """`until` for code without an event loop (fixtures, threads, Playwright's sync API). `pause`
    waits between two looks: Playwright's `page.wait_for_timeout` lets it dispatch events meanwhile."""
    deadline = time.monotonic() + seconds
    last: Any = None
    while True:
        try:
            last = check()
        except ignoring as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise _never(what, seconds, last)
        pause(EVERY)


def _alive(process: subprocess.Popen[bytes] | None, log: object) -> None:
    if process is not None and process.poll() is not None:
        raise AssertionError(f"the server exited with {process.returncode} before it answered; see {log}")


def answers_blocking(url: str | urllib.request.Request, process: subprocess.Popen[bytes] | None = None,
                     log: object = "its output", seconds: float = 30.0, context: ssl.SSLContext | None = None) -> None:
    """Until GET `url` answers 200; fails at once if `process` (the server) has exited."""
    def answered() -> bool:
        _alive(process, log)
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False
    target = url.full_url if isinstance(url, urllib.request.Request) else url
    until_blocking(answered, f"{target} answering 200", seconds)


async def answers(url: str, process: subprocess.Popen[bytes] | None = None, log: object = "its output",
                  seconds: float = 30.0) -> None:
    """`answers_blocking` without blocking the event loop."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        async def answered() -> bool:
            _alive(process, log)
            try:
                async with session.get(url) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                return False
        await until(answered, f"{url} answering 200", seconds)


async def stored(db: Any, sql: str, *args: Any) -> Any:
    """A query's first non-empty value (what the service's batched writers put there by themselves)."""
    return await until(lambda: db.fetchval(sql, *args), f"a value for {sql} {args}")
