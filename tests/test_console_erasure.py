"""The console's erase button: an agent with the `admin` role (or the admin key) erases a user from
their page, typing the user id to confirm, audited under the agent's name; `support` and `operator`
see no button and are refused (403); a POST without the session's CSRF token is refused (403)."""
from __future__ import annotations

import re

from aiohttp import web
from aiohttp.test_utils import TestClient

from .test_console import CSRF
from .test_erasure import ZEROS, traces
from .test_keys import agent_cookie
from .test_observe import activate

Client = TestClient[web.Request, web.Application]


def as_agent(client: Client, who: str, *roles: str) -> None:
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({"tracker_console": agent_cookie(client.app, who, *roles)})


async def user_page(client: Client, user: str) -> tuple[str, str]:
    """The user's page and its CSRF token."""
    resp = await client.get(f"/support/users/{user}", allow_redirects=False)
    assert resp.status == 200
    text = await resp.text()
    return text, CSRF.findall(text)[0]


async def test_an_admin_agent_erases_a_user_from_their_page(client: Client, tokens, db, settings):
    await activate(client, tokens, "console-erased")
    as_agent(client, "ada@example.com", "admin")
    page, csrf = await user_page(client, "console-erased")
    assert 'action="/support/users/console-erased/erase"' in page
    # Not confirmed (the user id not typed again): refused, nothing erased.
    resp = await client.post("/support/users/console-erased/erase", data={"csrf": csrf, "confirm": "someone"})
    assert resp.status == 400
    assert "clicks" in await traces(db, settings, "console-erased")
    resp = await client.post("/support/users/console-erased/erase", data={"csrf": csrf, "confirm": "console-erased"})
    assert resp.status == 200, await resp.text()
    done = await resp.text()
    cells = re.search(r'<table class="list" id="erased">.*?<tbody><tr>(.*?)</tr>', done, re.S)
    assert cells is not None
    assert re.findall(r"<td>(\d+)</td>", cells.group(1))[0] == "1"  # its one click
    assert await traces(db, settings, "console-erased") == []
    entries = await db.fetch("SELECT actor, action FROM audit_log WHERE user_id = 'console-erased' "
                             "AND action = 'user.erase'")
    assert [(e["actor"], e["action"]) for e in entries] == [("ada@example.com", "user.erase")]
    again = await client.post("/support/users/console-erased/erase", data={"csrf": csrf, "confirm": "console-erased"})
    assert again.status == 200
    counts = re.search(r'<tbody><tr>(.*?)</tr>', (await again.text()).split('id="erased"')[1], re.S)
    assert counts is not None and re.findall(r"<td>(\d+)</td>", counts.group(1)) == ["0"] * len(ZEROS)


async def test_support_and_operator_see_no_erase_button_and_are_refused(client: Client, tokens, db, settings):
    await activate(client, tokens, "console-kept")
    for role in ("support", "operator"):
        as_agent(client, "sam@example.com", role)
        page, csrf = await user_page(client, "console-kept")
        assert "/erase" not in page, role
        resp = await client.post("/support/users/console-kept/erase", data={"csrf": csrf, "confirm": "console-kept"})
        assert resp.status == 403, role
        assert (await resp.json())["error"] == "forbidden"
    as_agent(client, "ada@example.com", "admin")
    resp = await client.post("/support/users/console-kept/erase", data={"confirm": "console-kept"})
    assert resp.status == 403 and (await resp.json())["error"] == "csrf"
    assert "clicks" in await traces(db, settings, "console-kept")
