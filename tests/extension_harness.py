"""What the extension's browser tests share: the sites the shopper walks through, the extension built
for the served tracker, Debian's chromium with it loaded, and ways to look at what the extension did.

`--host-resolver-rules` maps the real-looking hosts onto one local server, which answers TLS and plain
HTTP on one port (a TLS handshake starts with byte 0x16), so that `http://app.example.com` is the same
site without TLS. The extension is copied to a temporary folder with `config.js` naming the served
tracker, as a deployment names its own service."""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request

import pytest
import redis
import requests

from tracker.domain.tokens import UserTokens
from tracker.settings import Settings
from tracker.store.redis_keys import state_key

from .conftest import ADMIN_KEY, SECRET, served
from .test_console_browser import SHOTS
from .waiting import answers_blocking, until_blocking

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "clients" / "extension"
MODULE = ROOT / "clients" / "js" / "tracker-client.js"
CHROMIUM = Path("/usr/bin/chromium")
HOSTS = ("ad.admitad.com", "aliexpress.ru", "coupons.example", "app.example.com")
SIGN_IN = "https://app.example.com/extension/connect"  # the page of our site that hands over credentials
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BANNER = "#tracker-cashback-banner"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
STORE_PAGE = """<!doctype html><meta charset=utf-8><title>AliExpress: {path}</title>
<style>body {{ font: 16px sans-serif; margin: 0; }} header {{ background: #e62e04; color: #fff; padding: 20px; font-size: 24px; }}
main {{ padding: 24px; }} .item {{ border: 1px solid #ddd; padding: 16px; width: 420px; }}</style>
<header>AliExpress</header>
<main><div class=item><h1 id=title>Wireless earbuds</h1><p>2 468,00 ₽</p><a id=next href="/item/1005002.html">Another item</a></div>
<h2>Checkout</h2><form id=checkout onsubmit="event.preventDefault(); document.getElementById('done').textContent = 'Coupon applied'">
<input name=promo_code placeholder="Promo code"> <button id=apply type=submit>Apply</button></form><p id=done></p></main>"""
COUPON_PAGE = """<!doctype html><meta charset=utf-8><title>Best coupons</title>
<h1>AliExpress coupons</h1><a id=deal href="/out?shop=aliexpress">Get 10% off at AliExpress</a>"""
APP_PAGE = """<!doctype html><meta charset=utf-8><title>Our cashback site</title>
<script type=module>import { TrackerClient } from "/tracker-client.js"; window.TrackerClient = TrackerClient;
window.ready = true;</script>"""


class Sites(BaseHTTPRequestHandler):
    """The network's redirect hop, the store, a coupon site and our own site, told apart by Host."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        host = (self.headers.get("Host") or "").split(":")[0]
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/tracker-client.js":  # each site embeds its own copy
            self._send(200, MODULE.read_bytes(), {"Content-Type": "text/javascript"})
        elif host == "ad.admitad.com" and url.path.startswith("/g/"):
            self._send(302, b"", {"Location": query["ulp"][0]})  # the network sets its cookie and sends on
        elif host == "aliexpress.ru":
            self._send(200, STORE_PAGE.format(path=url.path).encode(), {"Content-Type": "text/html; charset=utf-8"})
        elif host == "coupons.example" and url.path == "/out":
            # The coupon site sends the shopper on through its own CJ link: the foreign parameter lands.
            self._send(302, b"", {"Location": "https://aliexpress.ru/item/1005001.html?cjevent=7d1e2a90c4b311ef80d5"})
        elif host == "coupons.example":
            self._send(200, COUPON_PAGE.encode(), {"Content-Type": "text/html; charset=utf-8"})
        elif host == "app.example.com":
            self._send(200, APP_PAGE.encode(), {"Content-Type": "text/html; charset=utf-8"})
        else:
            self._send(404, b"not here", {"Content-Type": "text/plain"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class TlsOrPlain(ThreadingHTTPServer):
    """Answers TLS and plain HTTP on one port. The first byte is read in the request's thread: a
    preconnected socket that sends nothing must not block accept() for everyone."""
    tls: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        wrapped = None
        try:
            if request.recv(1, socket.MSG_PEEK) == b"\x16":
                request = wrapped = self.tls.wrap_socket(request, server_side=True)
            super().finish_request(request, client_address)
        finally:
            if wrapped is not None:
                wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a browser dropping a preconnected socket, a handshake it gave up on


@pytest.fixture(scope="module")
def sites(tmp_path_factory: Any) -> Iterator[int]:
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
                    "-addext", "subjectAltName=" + ",".join(f"DNS:{h}" for h in HOSTS)],
                   check=True, capture_output=True)
    server = TlsOrPlain(("127.0.0.1", 0), Sites)
    server.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.tls.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    trust = ssl.create_default_context(cafile=folder / "cert.pem")
    trust.check_hostname = False  # asked by address; the certificate names the mapped hosts
    answers_blocking(Request(f"https://127.0.0.1:{port}/", headers={"Host": "coupons.example"}), context=trust)
    answers_blocking(Request(f"http://127.0.0.1:{port}/", headers={"Host": "app.example.com"}))
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tracker_settings(servers: Any, database: str, redis_prefix: str, tmp_path_factory: Any) -> Settings:
    return Settings(database_url=database, redis_url=servers[1], data_dir=tmp_path_factory.mktemp("e2e"),
                    secret=SECRET, admin_key=ADMIN_KEY, redis_prefix=redis_prefix)


@pytest.fixture(scope="module")
def tracker(tracker_settings: Settings) -> Iterator[str]:
    with served(tracker_settings, env={"TRACKER_ADMIN_KEY": ADMIN_KEY,
                                       "TRACKER_CORS_ORIGINS": "https://app.example.com"}) as (_, base):
        yield base


def build_extension(folder: Path, service: str) -> Path:
    """The extension as a deployment ships it: `config.js` names the service and our sign-in page, and
    the service's origin is in `host_permissions` (here a loopback address over plain HTTP)."""
    target = folder / "extension"
    shutil.copytree(EXTENSION, target, symlinks=False)  # the symbolic link to tracker-client.js, resolved
    (target / "config.js").write_text(
        f"export const CONFIG = Object.freeze({json.dumps({'serviceUrl': service, 'signInUrl': SIGN_IN})});\n")
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["host_permissions"] = [*manifest.get("host_permissions", []), "http://127.0.0.1/*"]
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


@pytest.fixture(scope="module")
def browser(sites: int, tracker: str, tmp_path_factory: Any) -> Iterator[Any]:
    """A persistent context (an extension needs one) with the extension loaded; started after the
    served tracker (and its database), stopped before them."""
    from playwright.sync_api import sync_playwright

    extension = build_extension(tmp_path_factory.mktemp("build"), tracker)
    rules = ", ".join(f"MAP {host} 127.0.0.1:{sites}" for host in HOSTS)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM), headless=False,
            ignore_default_args=["--disable-extensions"], ignore_https_errors=True,
            viewport={"width": 1100, "height": 700},
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  f"--host-resolver-rules={rules}",
                  # Every mapped host is this test's own site with its self-signed certificate. Playwright's
                  # ignore_https_errors reaches a tab only once it has attached to it, and a tab the
                  # extension opens can navigate first: on a busy machine its hop to the site then
                  # ended on the certificate interstitial ("Your connection is not private", on
                  # chrome-error://chromewebdata/), in 3 of 6 runs beside two busy cores; none with this.
                  "--ignore-certificate-errors",
                  # A shopper's browser: headless chromium names itself HeadlessChrome, which tracker
                  # takes for a bot, and a bot's click has nothing to observe.
                  f"--user-agent={USER_AGENT}",
                  f"--disable-extensions-except={extension}", f"--load-extension={extension}"])
        worker = context.service_workers[0] if context.service_workers else context.wait_for_event(
            "serviceworker", timeout=10_000)
        assert worker.url.endswith("/background.js")
        _warm_up(context)
        SHOTS.mkdir(parents=True, exist_ok=True)
        yield context, worker
        context.close()


def _warm_up(context: Any) -> None:
    """Reach each mapped host once before the tests: a host the browser cannot reach fails the set-up
    with its name, not a test with a timeout."""
    page = context.new_page()
    try:
        for host in HOSTS:
            page.goto(f"https://{host}/", wait_until="load", timeout=10_000)
            if page.url.startswith("chrome-error:"):
                text = page.evaluate("() => document.body.innerText.slice(0, 200)")
                raise AssertionError(f"the local test site for {host} did not answer the browser: {text}")
    finally:
        page.close()


def sign_in(worker: Any, base: str, user: str) -> str:
    """The service's URL and the user's token into the extension, as its options page stores them."""
    token = UserTokens(SECRET).mint(user)
    worker.evaluate("([baseUrl, token]) => chrome.storage.local.set({baseUrl, token})", [base, token])
    return token


def activate(browser: Any, to: str) -> tuple[Any, str]:
    """The extension's activate action: a new tab on /go; returns (page, click id) once on the store."""
    context, worker = browser
    with context.expect_page() as opened:
        worker.evaluate("(to) => trackerExtension.activate('aliexpress', to)", to)
    page = opened.value
    try:
        page.wait_for_url("https://aliexpress.ru/**", timeout=10_000, wait_until="commit")
    except Exception:  # noqa: BLE001 - reported with where the tab is, and the error page's text
        text = page.evaluate("() => document.body.innerText.slice(0, 200)") if page.url.startswith("chrome-") else ""
        raise AssertionError(f"the activation tab never reached the store; it is at {page.url} {text}") from None
    page.wait_for_selector("#title")
    return page, tab_click(worker, page)


def tab_click(worker: Any, page: Any, other_than: str | None = None) -> str:
    """The click id the extension follows in this page's tab."""
    def new_click() -> str | None:
        clicks = worker.evaluate("() => [...trackerExtension.tabs.values()].map((t) => t.clickId)")
        fresh = [c for c in clicks if c != other_than]
        return str(fresh[-1]) if fresh and (other_than is None or other_than not in clicks) else None
    return until(page, new_click, "the extension following a new click in the tab")


def tab_id(worker: Any, page: Any, cid: str) -> int:
    """The browser's id of the tab the extension follows for this click."""
    return int(until(page, lambda: worker.evaluate(
        "(cid) => [...trackerExtension.tabs].find(([, t]) => t.clickId === cid)?.[0]", cid), "the click's tab"))


def until(page: Any, check: Callable[[], Any], what: str, seconds: float = 5.0) -> Any:
    """`check()`'s first true answer, Playwright dispatching the page's events meanwhile."""
    return until_blocking(check, what, seconds, pause=lambda s: page.wait_for_timeout(s * 1000))


def reported(worker: Any) -> list[dict[str, Any]]:
    """What the extension queued for tracker or acted on, oldest first: {tab, click, what, detail}."""
    return list(worker.evaluate("() => trackerExtension.log"))


def detector_state(settings: Settings, cid: str) -> dict[str, Any] | None:
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        raw = client.get(state_key(settings.redis_prefix, cid))
    finally:
        client.close()
    return json.loads(raw) if raw else None


def support_view(base: str, cid: str) -> dict[str, Any]:
    return dict(requests.get(f"{base}/v1/clicks/{cid}", headers=ADMIN, timeout=10).json())


def navigations(base: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('tracker_observe_events_total{type="navigation"}'))


def extension_worlds(page: Any) -> list[str]:
    """The extension's script worlds in the page's frames (a content script runs in one), as the
    browser lists them to a debugger: seen from outside, whatever the extension says."""
    cdp = page.context.new_cdp_session(page)
    contexts: list[dict[str, Any]] = []
    try:
        cdp.on("Runtime.executionContextCreated", lambda event: contexts.append(event["context"]))
        cdp.send("Runtime.enable")  # announces every existing context before it answers
    finally:
        cdp.detach()
    return [c["origin"] for c in contexts if str(c.get("origin", "")).startswith("chrome-extension://")]


class Banner:
    """The banner as the shopper meets it: its host element is in the page, its inside is in a closed
    shadow root that no page script (and no Playwright locator) reaches; the browser's debugger
    protocol does, and a click goes where a shopper's mouse would."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.host = page.locator(BANNER)

    def _inside(self, selector: str, function: str) -> Any:
        cdp = self.page.context.new_cdp_session(self.page)
        try:
            root = cdp.send("DOM.getDocument", {"depth": -1, "pierce": True})["root"]
            host = _find(root, lambda node: "tracker-cashback-banner" in node.get("attributes", [])[1::2])
            assert host is not None, "no banner in the page"
            shadow = host["shadowRoots"][0]
            assert shadow["shadowRootType"] == "closed", shadow["shadowRootType"]
            node = cdp.send("DOM.querySelector", {"nodeId": shadow["nodeId"], "selector": selector})["nodeId"]
            handle = cdp.send("DOM.resolveNode", {"nodeId": node})["object"]["objectId"]
            return cdp.send("Runtime.callFunctionOn", {"objectId": handle, "functionDeclaration": function,
                                                       "returnByValue": True})["result"]["value"]
        finally:
            cdp.detach()

    def text(self) -> str:
        return str(self._inside(".bar", "function () { return this.innerText; }"))

    def click(self, selector: str = ".again") -> None:
        """A real click (the browser's input, trusted) in the middle of a button of the banner."""
        box = self._inside(selector, "function () { const r = this.getBoundingClientRect();"
                                     " return [r.x + r.width / 2, r.y + r.height / 2]; }")
        self.page.mouse.click(box[0], box[1])


def _find(node: dict[str, Any], match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    if match(node):
        return node
    for child in [*node.get("children", []), *node.get("shadowRoots", []), *([node["contentDocument"]]
                                                                              if "contentDocument" in node else [])]:
        found = _find(child, match)
        if found is not None:
            return found
    return None
