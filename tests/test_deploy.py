"""deploy/: manifests parse and carry what operators rely on; rules pass promtool; every metric a
dashboard panel or rule names is exported by the running service; maintain is idempotent."""
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tracker.app import create_app
from tracker.store.retention import RETAINED

from .conftest import ADMIN, BROWSER, cli
from .waiting import until

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def manifests():
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_manifests():
    docs = manifests()
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
                 "Secret", "Job", "CronJob", "ServiceMonitor"):
        assert kind in docs, kind
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > 20 + 5  # drain (10 s requests + 10 s queue) + preStop
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/lib/tracker" in mounts  # the spool
    refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
    assert {r["key"] for r in refs if not r.get("optional")} == {"database-url", "redis-url", "secret", "admin-key"}
    # The console's OpenID sign-in: optional keys, each named (commented out) in the example Secret.
    optional = {r["key"] for r in refs if r.get("optional")}
    assert optional == {"oidc-issuer", "oidc-client-id", "oidc-client-secret"}
    example = (DEPLOY / "k8s" / "secret.example.yaml").read_text()
    assert all(f"# {key}:" in example for key in optional)
    assert docs["Job"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["maintain"]
    assert docs["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    merchants = yaml.safe_load(docs["ConfigMap"]["data"]["merchants.yaml"])
    from tracker.domain.merchants import parse_merchants_file
    from tracker.domain.profiles import profile_names

    assert parse_merchants_file(merchants, profile_names()).merchants


def test_dockerfile_and_compose():
    docker = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", docker, re.M)) == 2  # multi-stage
    assert "build-essential" not in docker.split("FROM python:3.11-slim\n")[-1]  # no build tools at the end
    assert re.search(r"^USER tracker", docker, re.M) and "HEALTHCHECK" in docker
    assert 'ENTRYPOINT ["tracker"]' in docker
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"postgres", "redis", "migrate", "tracker", "prometheus", "grafana"} <= set(compose["services"])


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed and could not be installed here (Debian package 'prometheus'); "
                    "make test installs it where apt-get works")
    return tool


@pytest.mark.slow
def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(DEPLOY / "prometheus/rules.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_promtool_rule_unit_tests():
    out = subprocess.run([_promtool(), "test", "rules", "rules_test.yaml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_runbook_section():
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yaml").read_text())
    runbook = (DEPLOY.parent / "docs/operations.md").read_text().lower()
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 8
    for alert in alerts:
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        assert f"### {alert['alert'].lower()}" in runbook, anchor
        assert anchor == alert["alert"].lower()


def metric_names_used() -> set[str]:
    texts = [(DEPLOY / "prometheus/rules.yaml").read_text()]
    dash = json.loads((DEPLOY / "grafana/tracker.json").read_text())
    texts += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    # Metric names, not recording-rule names (level:metric:operations).
    return {m for text in texts for m in re.findall(r"(?<![:a-z_])tracker_[a-z_]+(?![a-z_:])", text)}


async def test_dashboard_and_rule_metrics_are_exported(aiohttp_client, settings, tokens, db):
    # A subscriber, so that the webhook metrics have their series (the dispatcher primes them when
    # it loads one); it takes no event of this test.
    await db.execute("INSERT INTO webhooks (name, url, secret, types) VALUES ('ops-hook', 'http://127.0.0.1:9/', "
                     "'whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3', '{postback.orphaned}') ON CONFLICT DO NOTHING")
    client = await aiohttp_client(create_app(dataclasses.replace(settings, rate_limit_user=2)))
    resp = await client.get("/go/aliexpress", params={"u": tokens.mint("ops-1")}, allow_redirects=False, headers=BROWSER)
    cid = resp.headers["X-Click-Id"]
    for _ in range(2):
        await client.get("/go/aliexpress", params={"u": tokens.mint("ops-1")}, allow_redirects=False, headers=BROWSER)
    await client.get("/go/aliexpress", params={"u": "bad"})
    await client.get("/postback/admitad", params={"token": "test-admitad-token", "subid": cid, "order_id": "OPS-1",
                                                  "status": "approved", "payment_sum": "1", "currency": "RUB"})
    await client.get("/postback/admitad", params={"token": "nope", "order_id": "OPS-2"})
    await client.post("/v1/observe", headers={"Authorization": f"Bearer {tokens.mint('ops-1')}"},
                      json={"click_id": cid, "events": [{"type": "navigation", "url": "https://aliexpress.ru/"},
                                                         {"type": "navigation", "url": "https://aliexpress.ru/?cjevent=1234567890"}]})
    used = metric_names_used()
    assert len(used) >= 10
    async def none_missing() -> bool:  # the writers' metrics appear once their batches have gone out
        text = await (await client.get("/metrics", headers=ADMIN)).text()
        missing = sorted(used - set(re.findall(r"^([a-z_]+)(?:\{| )", text, re.M)))
        assert missing == [], f"missing: {missing}"
        return True
    await until(none_missing, "every metric the code uses shown by /metrics", ignoring=(AssertionError,))


def test_maintain_twice_changes_nothing_the_second_time(settings):
    first = cli(settings, "maintain")
    second = cli(settings, "maintain")
    assert first.returncode == second.returncode == 0, first.stderr
    assert json.loads(first.stdout)["created"]  # the module database only had near partitions, if any
    assert json.loads(second.stdout) == {"created": [], "dropped": [], "pruned": {r.table: 0 for r in RETAINED},
                                         "erasures_swept": 0, "addresses_truncated": 0}
