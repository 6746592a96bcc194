"""clients/js/tracker-client.js on its own, in Debian's chromium: batching, retries (503 with
Retry-After, network errors), the drop on 401, the keepalive flush of a hidden page and watch()'s
reconnection. The page and "tracker" are one origin answered by request interception (page.route),
so that every answer, failures included, is the test's choice; tests/test_extension_e2e.py runs the
module against the real service."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .waiting import until_blocking

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "clients" / "js" / "tracker-client.js"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ORIGIN = "https://app.example.com"
pytestmark = [pytest.mark.browser, pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")]
PAGE = """<!doctype html><title>shop</title><p id=ok>the page works</p>
<script type=module>
import { TrackerClient } from "/tracker-client.js";
window.TrackerClient = TrackerClient;
window.sent = [];
const original = window.fetch;
window.fetch = (url, init) => { window.sent.push({url: String(url), keepalive: !!(init && init.keepalive)});
                                 return original(url, init); };
window.ready = true;
</script>"""
CID = "FP7nipaOl86qYW93w2uKh-"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


class Tracker:
    """The routed stand-in for tracker: each POST /v1/observe is recorded and answered by `answer`."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.observed: list[dict[str, Any]] = []  # {"body", "headers", "at"}
        self.answer: Callable[[int], tuple[int, dict[str, str], str]] = lambda n: (200, {}, json.dumps(
            {"click_id": CID, "state": "active", "action": "none", "signals": []}))
        self.streams: list[str] = []
        self.stream_answers: list[str] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda msg: self.warnings.append(msg.text) if msg.type == "warning" else None)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.route(f"{ORIGIN}/**", self._handle)

    def _handle(self, route: Any) -> None:
        request = route.request
        path = request.url[len(ORIGIN):]
        if path == "/":
            route.fulfill(status=200, content_type="text/html", body=PAGE)
        elif path == "/tracker-client.js":
            route.fulfill(status=200, content_type="text/javascript", body=MODULE.read_text())
        elif path == "/v1/observe":
            self.observed.append({"body": json.loads(request.post_data or "{}"), "headers": request.headers,
                                  "at": time.monotonic()})
            status, headers, body = self.answer(len(self.observed))
            if status == 0:
                route.abort("connectionrefused")
            else:
                route.fulfill(status=status, headers={"Content-Type": "application/json", **headers}, body=body)
        elif path.startswith("/v1/clicks/"):
            self.streams.append(request.headers.get("authorization", ""))
            body = self.stream_answers.pop(0) if self.stream_answers else ""
            if body == "refuse":
                route.fulfill(status=401, content_type="application/json", body='{"error":"unauthorized"}')
            else:
                route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
        else:
            route.fulfill(status=404, body="")

    def until(self, check: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
        # Playwright's own pause, so that it dispatches the route handlers meanwhile.
        until_blocking(check, what, seconds, pause=lambda s: self.page.wait_for_timeout(s * 1000))


@pytest.fixture
def tracker(browser: Any) -> Iterator[Tracker]:
    context = browser.new_context()
    page = context.new_page()
    stand_in = Tracker(page)
    page.goto(f"{ORIGIN}/")
    page.wait_for_function("window.ready === true")
    yield stand_in
    context.close()


def new_client(tracker: Tracker, **options: Any) -> None:
    tracker.page.evaluate("""(options) => { window.client = new TrackerClient(
        {baseUrl: "https://app.example.com/", token: "shopper-1.sig", ...options}); }""", options)


def test_events_go_in_batches_of_at_most_100_within_a_second(tracker):
    new_client(tracker)
    tracker.page.evaluate("""() => { for (let i = 0; i < 250; i++) client.navigation("A", "https://aliexpress.ru/item/" + i + ".html");
        client.promoCode("B", "SAVE10"); client.checkout("B", {device: "d-1", basketItemsBeforeActivation: 2});
        client.navigation("A", "https://aliexpress.ru/cart"); }""")
    tracker.until(lambda: len(tracker.observed) == 4, "four requests, without a flush()")
    sizes = [(o["body"]["click_id"], len(o["body"]["events"])) for o in tracker.observed]
    assert sizes == [("A", 100), ("A", 100), ("A", 51), ("B", 2)]
    urls = [e["url"] for o in tracker.observed[:3] for e in o["body"]["events"]]
    assert urls[:250] == [f"https://aliexpress.ru/item/{i}.html" for i in range(250)] and urls[-1].endswith("/cart")
    assert tracker.observed[3]["body"]["events"][0] == {"type": "promo_code", "code": "SAVE10",
                                                        "at": tracker.observed[3]["body"]["events"][0]["at"]}
    checkout = tracker.observed[3]["body"]["events"][1]
    assert (checkout["type"], checkout["device"], checkout["basket_items_before_activation"]) == ("checkout", "d-1", 2)
    assert all(o["headers"]["authorization"] == "Bearer shopper-1.sig" for o in tracker.observed)
    assert checkout["at"].endswith("Z")
    # A lone event leaves by itself, within about a second, without flush().
    tracker.page.evaluate("() => client.navigation('C', 'https://aliexpress.ru/')")
    tracker.until(lambda: len(tracker.observed) == 5, "the lone event, within a second or so", seconds=3)


def test_a_503_with_retry_after_is_retried_after_it_and_flush_never_rejects(tracker):
    answers = {1: (503, {"Retry-After": "1"}, '{"error":"unavailable","message":"retry later"}')}
    ok = tracker.answer
    tracker.answer = lambda n: answers.get(n) or ok(n)
    new_client(tracker, retryBaseMs=50)
    first = tracker.page.evaluate("async () => { client.navigation('A', 'https://aliexpress.ru/x'); return await client.flush(); }")
    assert first is None  # nothing answered yet, and no exception for the page
    tracker.until(lambda: len(tracker.observed) == 2, "the retry")
    assert tracker.observed[1]["at"] - tracker.observed[0]["at"] >= 0.95  # not before Retry-After
    assert tracker.observed[1]["body"] == tracker.observed[0]["body"]
    answer = tracker.page.evaluate("async () => await client.flush()")
    assert answer["state"] == "active"
    assert tracker.errors == []


def test_network_errors_and_429_are_retried_with_backoff(tracker):
    tracker.answer = lambda n: {1: (0, {}, ""), 2: (429, {"Retry-After": "0"}, "{}")}.get(n) or (
        200, {}, '{"click_id": "A", "state": "overwritten", "action": "reactivate", "signals": []}')
    new_client(tracker, retryBaseMs=50)
    tracker.page.evaluate("async () => { client.promoCode('A', 'SAVE10'); await client.flush(); }")
    tracker.until(lambda: len(tracker.observed) == 3, "two retries")
    assert [o["body"] for o in tracker.observed] == [tracker.observed[0]["body"]] * 3
    assert tracker.page.evaluate("async () => (await client.flush()).action") == "reactivate"
    assert tracker.errors == []


def test_a_401_drops_the_batch_with_a_console_warning(tracker):
    tracker.answer = lambda n: (401, {}, '{"error":"unauthorized","message":"a valid user token is required"}') \
        if n == 1 else (200, {}, '{"click_id": "A", "state": "active", "action": "none", "signals": []}')
    new_client(tracker, retryBaseMs=50)
    tracker.page.evaluate("async () => { client.navigation('A', 'https://aliexpress.ru/1'); await client.flush(); }")
    tracker.until(lambda: any("refused 1 report" in w for w in tracker.warnings), "the console warning")
    tracker.page.evaluate("async () => { client.navigation('A', 'https://aliexpress.ru/2'); await client.flush(); }")
    assert len(tracker.observed) == 2  # nothing was retried in between
    assert [e["url"] for e in tracker.observed[1]["body"]["events"]] == ["https://aliexpress.ru/2"]


def test_a_hidden_page_flushes_at_once_with_keepalive(tracker):
    new_client(tracker, batchDelayMs=60000)
    tracker.page.evaluate("""() => { client.navigation('A', 'https://aliexpress.ru/checkout');
        Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
        document.dispatchEvent(new Event('visibilitychange')); }""")
    tracker.until(lambda: len(tracker.observed) == 1, "the flush of a hidden page (the batch delay is a minute)")
    sent = tracker.page.evaluate("window.sent")
    assert sent == [{"url": f"{ORIGIN}/v1/observe", "keepalive": True}]


def test_watch_reports_changes_and_reconnects(tracker):
    active = f'event: state\ndata: {{"click_id":"{CID}","state":"active","action":"none"}}\n\n: heartbeat\n\n'
    overwritten = f'event: state\ndata: {{"click_id":"{CID}","state":"overwritten","action":"reactivate"}}\n\n'
    # Each answer ends (a dropped connection); the second repeats the state, the third changes it.
    tracker.stream_answers = [active, active, overwritten, "refuse"]
    new_client(tracker, retryBaseMs=50)
    tracker.page.evaluate(f"""() => {{ window.changes = [];
        window.stop = client.watch("{CID}", (change) => window.changes.push(change)); }}""")
    tracker.until(lambda: len(tracker.streams) >= 4, "three reconnections")
    changes = tracker.page.evaluate("window.changes")
    assert [(c["state"], c["action"]) for c in changes] == [("active", "none"), ("overwritten", "reactivate")]
    assert set(tracker.streams) == {"Bearer shopper-1.sig"}
    tracker.until(lambda: any("not following it" in w for w in tracker.warnings), "a 401 ends the watch")
    tracker.page.wait_for_timeout(300)  # a stopped watch does not come back (backoff here is 50 ms)
    assert len(tracker.streams) == 4
    assert tracker.errors == []
