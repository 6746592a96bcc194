"""Every metric the public contract names is on /metrics of a freshly started `tracker serve`, before
any click, postback or signal: a series at 0 for each merchant and network, not a name that appears
only after its first event (a dashboard's rate() or an alert's increase() over a pod just restarted
saw nothing at all)."""
from __future__ import annotations

import re

import aiohttp
import pytest

from .conftest import load_merchants, serve_process
from .waiting import until

pytestmark = pytest.mark.fault

# The names the public contract lists under Operations and Events out (docs/api.md).
CONTRACT_METRICS = ("tracker_clicks_total", "tracker_redirect_duration_seconds", "tracker_spool_pending_clicks",
                    "tracker_postbacks_total", "tracker_conversions_total", "tracker_signals_total",
                    "tracker_webhook_deliveries_total", "tracker_webhook_backlog_seconds")


def samples(text: str) -> dict[str, list[str]]:
    """Metric name (without _bucket/_sum/_count) -> its sample lines."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = re.match(r"[a-z_]+", line)
        assert name is not None, line
        base = re.sub(r"_(bucket|sum|count)$", "", name.group(0))
        found.setdefault(base, []).append(line)
    return found


async def test_a_fresh_server_exports_every_contract_metric_for_each_merchant_and_network(settings, db):
    await db.execute("INSERT INTO webhooks (name, url, secret, types) VALUES ('fresh-hook', 'http://127.0.0.1:9/', "
                     "'whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3', '{postback.orphaned}') ON CONFLICT DO NOTHING")
    merchants = load_merchants()
    async with serve_process(settings, workers=2) as (_, base), aiohttp.ClientSession() as session:
        async def read() -> dict[str, list[str]]:
            async with session.get(base + "/metrics") as resp:
                assert resp.status == 200
                return samples(await resp.text())

        async def complete() -> dict[str, list[str]] | None:  # the webhook dispatcher loads a moment after start
            found = await read()
            return found if all(name in found for name in CONTRACT_METRICS) else None
        exported = await until(complete, "every metric the contract names on /metrics")
    clicks = "\n".join(exported["tracker_clicks_total"])
    conversions = "\n".join(exported["tracker_conversions_total"])
    signals = "\n".join(exported["tracker_signals_total"])
    for slug in (m.slug for m in merchants.merchants):
        assert f'merchant="{slug}"' in clicks and f'merchant="{slug}"' in conversions, slug
        assert f'merchant="{slug}"' in signals, slug
    postbacks = "\n".join(exported["tracker_postbacks_total"])
    for network in (n.name for n in merchants.networks):
        assert f'network="{network}"' in postbacks, network
