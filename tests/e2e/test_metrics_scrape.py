"""Metrics on the real local stack: after a run, each stage function's /_/metrics shows the
stage duration histogram of that service and stage, the gateway's /metrics its queue, and
the stack's Prometheus (`up --observe`) has scraped them and loaded the alert rules."""

from __future__ import annotations

import time

import pytest
import requests
from conftest import commit_all, git, start_run, wait_for_run
from prometheus_client.parser import text_string_to_metric_families

from faasci import stack as stack_file
from faasci.local import prometheus
from faasci.local.provider import function_ports

SERVICE = "metrics-e2e"  # one name for both tests: service labels are capped per process


@pytest.fixture(scope="module")
def finished_run(stack, gateway, tmp_path_factory):
    """One passed run of lint then unit (trivial commands) of SERVICE."""
    repo = tmp_path_factory.mktemp("metrics") / "repo"
    repo.mkdir()
    (repo / ".faasci.yml").write_text(
        f"service: {SERVICE}\nstages:\n  lint: {{run: ['true']}}\n  unit: {{run: ['true']}}\n"
    )
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "metrics")
    run = wait_for_run(gateway, start_run(gateway, repo))
    assert run["status"] == "passed", run
    return run


def scrape(url: str) -> dict[str, list]:
    """The samples of a metrics endpoint by metric family name."""
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(resp.text)}


def samples(families: dict, name: str, **labels) -> list:
    return [s for f in families.values() for s in f
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip


def test_stage_functions_show_the_duration_histogram_of_the_run(stack, finished_run):
    """lint's and unit's /_/metrics (on their own ports, as Prometheus scrapes them) hold the
    duration histogram, attempt outcome and queue wait of SERVICE's stage."""
    ports = function_ports(stack, stack_file.load(stack.stack_file))
    for stage in ("lint", "unit"):
        families = scrape(f"http://127.0.0.1:{ports[stage]}/_/metrics")
        labels = {"service": SERVICE, "stage": stage, "environment": ""}
        (count,) = samples(families, "faasci_stage_duration_seconds_count", **labels)
        assert count.value >= 1
        buckets = samples(families, "faasci_stage_duration_seconds_bucket", **labels)
        assert [b.labels["le"] for b in buckets][-1] == "+Inf" and len(buckets) > 10
        (passed,) = samples(families, "faasci_stage_attempts_total", status="passed", **labels)
        assert passed.value >= 1
        (waited,) = samples(families, "faasci_stage_queue_wait_seconds_count", **labels)
        assert waited.value >= 1
    unit = scrape(f"http://127.0.0.1:{ports['unit']}/_/metrics")
    (hop,) = samples(unit, "faasci_stage_handoff_seconds_count", service=SERVICE, stage="unit")
    assert hop.value >= 1  # the lint → unit hop


def test_metrics_are_not_served_through_the_gateway(stack, finished_run):
    """/function/<name>/_/metrics is not found: a function's metrics are for the scraper."""
    resp = requests.get(f"{stack.gateway_url}/function/lint/_/metrics", timeout=10)
    assert resp.status_code == 404
    assert resp.json()["field"] == "path"


def test_the_gateway_reports_its_queue(stack):
    """The gateway's /metrics says its queue (NATS) answers and how much waits in it."""
    families = scrape(f"{stack.gateway_url}/metrics")
    (up,) = samples(families, "faasci_queue_up")
    assert up.value == 1
    (pending,) = samples(families, "faasci_queue_pending_messages")
    assert pending.value >= 0


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} after {timeout:.0f}s"
        time.sleep(1)
    return found


def test_prometheus_scrapes_the_run_s_histogram(stack, finished_run):
    """The stack's Prometheus answers /api/v1/query with the run's stage duration series,
    labelled with the function it came from, once it has scraped them."""
    query = f'faasci_stage_duration_seconds_count{{service="{SERVICE}",stage="unit"}}'
    (series,) = wait_for(lambda: prometheus.query(stack, query), 60, "no series in Prometheus")
    assert series["metric"]["faas_function"] == "unit"
    assert series["metric"]["job"] == "functions"
    assert float(series["value"][1]) >= 1


def test_prometheus_loaded_the_alert_rules_and_scrapes_every_function(stack):
    """Its rules API lists the alert rules, and every function of stack.yml is a target."""
    rules = requests.get(f"{prometheus.url(stack)}/api/v1/rules", timeout=10).json()
    names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
    assert {"FaasciPipelineErrorRate", "FaasciQueueBacklog", "FaasciRunsStuck",
            "FaasciSlackAlertsFailing", "FaasciBudget80Percent"} <= names  # fmt: skip

    def all_up():
        targets = requests.get(f"{prometheus.url(stack)}/api/v1/targets", timeout=10).json()
        active = targets["data"]["activeTargets"]
        up = {t["labels"].get("faas_function") or t["labels"]["job"]
              for t in active if t["health"] == "up"}  # fmt: skip
        return up if set(stack_file.load(stack.stack_file).functions) | {"gateway"} <= up else None

    wait_for(all_up, 60, "not every function and the gateway are up in Prometheus")
