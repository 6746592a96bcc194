"""Bot and HEAD clicks have nothing to observe: POST /v1/observe answers 404 as for an unknown click,
stores no signal or state and emits no event (a link preview cannot be overwritten, and the app must
not be told to re-activate it)."""
from __future__ import annotations

from tracker import keys
from tracker.store.events import read_feed, sequence

from .conftest import BROWSER
from .test_observe import activate, auth
from .waiting import stored, until

PREVIEW = {"User-Agent": "TelegramBot (like TwitterBot)"}
FOREIGN = [{"type": "promo_code", "code": "COUPONSITE"},
           {"type": "navigation", "url": "https://aliexpress.ru/?cjevent=abc1234567890"}]


async def click_of(client, tokens, user: str, method: str, headers: dict[str, str]) -> str:  # noqa: ANN001
    resp = await client.request(method, "/go/aliexpress", params={"u": tokens.mint(user)},
                                allow_redirects=False, headers=headers)
    assert resp.status == 302
    return resp.headers["X-Click-Id"]


async def announced(client) -> set[str]:  # noqa: ANN001
    """The click ids of every click.overwritten in the feed so far."""
    pool = client.server.app[keys.POOL]
    async with pool.acquire() as conn:
        async def ran() -> bool:
            return await sequence(conn) is not None
        await until(ran, "a run of the sequencer here")
    events, _ = await read_feed(pool, 0, 1000, ["click.overwritten"])
    return {e["data"]["click_id"] for e in events}


async def test_bot_and_head_clicks_are_not_observed(client, tokens, db):
    head = await click_of(client, tokens, "bot-obs-1", "HEAD", BROWSER)
    preview = await click_of(client, tokens, "bot-obs-1", "GET", PREVIEW)
    for cid in (head, preview):
        resp = await client.post("/v1/observe", json={"click_id": cid, "events": FOREIGN},
                                 headers=auth(tokens, "bot-obs-1"))
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    # A shopper's click after them, through the same writer and feed: once its overwrite is stored
    # and announced, anything the bots' observes had queued would be there too.
    human, _ = await activate(client, tokens, "bot-obs-1")
    resp = await client.post("/v1/observe", json={"click_id": human, "events": FOREIGN},
                             headers=auth(tokens, "bot-obs-1"))
    assert resp.status == 200 and (await resp.json())["state"] == "overwritten"
    await stored(db, "SELECT 1 FROM click_states WHERE click_id = $1 AND state = 'overwritten'", human)
    assert human in await until(lambda: announced(client), "the shopper's overwrite announced")
    assert await db.fetchval("SELECT count(*) FROM signals WHERE click_id = ANY ($1::text[])", [head, preview]) == 0
    assert await db.fetchval("SELECT count(*) FROM click_states WHERE click_id = ANY ($1::text[])",
                             [head, preview]) == 0
    assert not {head, preview} & await announced(client)


async def test_bot_and_head_clicks_have_no_event_stream(client, tokens, db):
    """The events stream of a bot's or a HEAD's click is a 404 too, as for an unknown click (there is
    no shopping tab to watch, and its state never changes); a shopper's click streams."""
    head = await click_of(client, tokens, "bot-obs-2", "HEAD", BROWSER)
    preview = await click_of(client, tokens, "bot-obs-2", "GET", PREVIEW)
    for cid in (head, preview):
        resp = await client.get(f"/v1/clicks/{cid}/events", headers=auth(tokens, "bot-obs-2"))
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    human, _ = await activate(client, tokens, "bot-obs-2")
    resp = await client.get(f"/v1/clicks/{human}/events", headers=auth(tokens, "bot-obs-2"))
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert b'"state":"active"' in await resp.content.readuntil(b"\n\n")
    resp.close()
