"""faasci.metrics: bounded labels, and what a run's stage attempts record in the registry."""

import threading

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from faasci import metrics, pipeline, runs, slack

PIPELINE = """\
service: {service}
stages:
  lint: {{run: [ruff check .]}}
  unit: {{run: [pytest], retries: 2}}
"""


def new_run(service: str) -> runs.Run:
    p = pipeline.parse(PIPELINE.format(service=service), "svc")
    return runs.new_run(p, repo="/src/x", ref="main", commit="a" * 40, source="/src/x")


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_bounded_label_keeps_the_first_values_and_calls_the_rest_other():
    """The first N distinct values keep their names; later ones are `other`, for good."""
    bound = metrics.Bounded(3)
    assert [bound(v) for v in ["a", "b", "a", "c", "d", "e", "b"]] == [
        "a", "b", "a", "c", "other", "other", "b",
    ]  # fmt: skip
    assert bound("d") == "other"  # a value once `other` stays `other`


def test_an_empty_value_stays_empty_and_takes_no_place():
    """No environment is an empty label value, not a counted one."""
    bound = metrics.Bounded(1)
    assert bound(None) == "" and bound("") == ""
    assert bound("prod") == "prod" and bound("staging") == "other"


def test_a_bounded_label_holds_under_concurrent_use():
    """Threads racing with 100 new values never get more than the limit through."""
    bound = metrics.Bounded(10)
    seen: set[str] = set()
    lock = threading.Lock()

    def use(start: int) -> None:
        for i in range(start, start + 25):
            got = bound(f"svc-{i}")
            with lock:
                seen.add(got)

    threads = [threading.Thread(target=use, args=(n * 25,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "other" in seen and len(seen - {"other"}) == 10


def test_unknown_failure_reasons_are_other():
    """Reasons come from a fixed set; anything else is `other`."""
    assert metrics.reason_label("infra") == "infra"
    assert metrics.reason_label("exit") == "exit"
    assert metrics.reason_label("disk on fire: /dev/sda") == "other"
    assert metrics.reason_label(None) == ""


def test_service_names_past_the_cap_share_one_series(monkeypatch):
    """With a cap of 2, a third service's stage durations go to service="other"."""
    monkeypatch.setattr(metrics, "service_label", metrics.Bounded(2))
    for name in ("cap-a", "cap-b", "cap-c"):
        run = new_run(name)
        taken = runs.claim(run, "lint", None, "w")
        runs.finish(run, "lint", taken.number, status="passed", exit_code=0)
        metrics.stage_finished(run, "lint", run.stage("lint").attempts[0])
    labels = {"stage": "lint", "environment": ""}
    assert sample("faasci_stage_duration_seconds_count", service="cap-a", **labels) == 1
    assert sample("faasci_stage_duration_seconds_count", service="cap-c", **labels) == 0
    assert sample("faasci_stage_duration_seconds_count", service="other", **labels) >= 1


def test_a_run_records_waits_hops_durations_outcomes_and_retries():
    """lint passes, unit fails and is retried: each stage's wait, the lint→unit hop, both
    durations, the outcomes by reason, the retry, and in-flight back to zero."""
    run, svc = new_run("metrics-run"), "metrics-run"
    lint = runs.claim(run, "lint", None, "w")
    metrics.stage_started(run, "lint", lint)
    base = {"service": svc, "environment": ""}
    assert sample("faasci_stage_attempts_in_flight", service=svc, stage="lint") == 1
    runs.finish(run, "lint", 1, status="passed", exit_code=0)
    metrics.stage_left(run, "lint")
    metrics.stage_finished(run, "lint", run.stage("lint").attempts[0], None)

    unit = runs.claim(run, "unit", None, "w")
    metrics.stage_started(run, "unit", unit)
    runs.finish(run, "unit", 1, status="failed", exit_code=1, reason="exit", error="red")
    metrics.stage_left(run, "unit")
    metrics.stage_finished(run, "unit", run.stage("unit").attempts[0],
                           {"hit": True, "restore_s": 0.2})  # fmt: skip

    assert sample("faasci_stage_queue_wait_seconds_count", stage="lint", **base) == 1
    assert sample("faasci_stage_queue_wait_seconds_count", stage="unit", **base) == 1
    assert sample("faasci_stage_handoff_seconds_count", stage="lint", **base) == 0  # the first
    assert sample("faasci_stage_handoff_seconds_count", stage="unit", **base) == 1
    assert sample("faasci_stage_duration_seconds_count", stage="unit", **base) == 1
    assert sample("faasci_stage_attempts_total", stage="lint", status="passed", reason="",
                  **base) == 1  # fmt: skip
    assert sample("faasci_stage_attempts_total", stage="unit", status="failed", reason="exit",
                  **base) == 1  # fmt: skip
    assert sample("faasci_stage_retries_total", stage="unit", **base) == 1
    assert sample("faasci_cache_lookups_total", service=svc, stage="unit", result="hit") == 1
    assert sample("faasci_cache_restore_seconds_sum", service=svc, stage="unit") == 0.2
    assert sample("faasci_stage_attempts_in_flight", service=svc, stage="unit") == 0
    assert sample("faasci_runs_finished_total", service=svc, status="failed") == 0  # retrying


def test_a_finished_run_counts_by_status():
    """The attempt that ends a run counts the run, by its status."""
    run = new_run("metrics-end")
    for stage in ("lint", "unit"):
        runs.claim(run, stage, None, "w")
        runs.finish(run, stage, 1, status="passed", exit_code=0)
        metrics.stage_finished(run, stage, run.stage(stage).attempts[0])
    assert run.status == "passed"
    assert sample("faasci_runs_finished_total", service="metrics-end", status="passed") == 1


def test_the_promotion_names_the_environment():
    """Once promote recorded its environment, the run's stages carry it as a label."""
    run = new_run("metrics-env")
    runs.claim(run, "lint", None, "w")
    run.stage("lint").attempts[0].promotion = {"environment": "staging"}
    assert metrics.environment_of(run) == "staging"
    assert metrics.environment_of(new_run("metrics-env")) == ""


def test_slack_deliveries_count_by_outcome():
    """A sent alert counts `sent`; Slack answering 503 counts `unavailable` and is raised."""
    before = sample("faasci_alert_deliveries_total", outcome="unavailable")
    sent = sample("faasci_alert_deliveries_total", outcome="sent")
    assert metrics.alert_delivery(lambda text: f"ts-{text}", "x") == "ts-x"

    def down(_):
        raise slack.SlackUnavailable("HTTP 503")

    with pytest.raises(slack.SlackUnavailable):
        metrics.alert_delivery(down, "x")
    assert sample("faasci_alert_deliveries_total", outcome="sent") == sent + 1
    assert sample("faasci_alert_deliveries_total", outcome="unavailable") == before + 1


def test_budget_used_sets_the_ratio():
    """budget_used(service, ratio) is the gauge the 80% rule reads."""
    metrics.budget_used("metrics-budget", 0.83)
    assert sample("faasci_budget_used_ratio", service="metrics-budget") == 0.83


def test_stuck_runs_count_by_kind():
    """A lost attempt and an unclaimed hand-off count under their kinds."""
    run = new_run("metrics-stuck")
    metrics.stuck(run, "unit", "lost")
    metrics.stuck(run, None, "handoff")
    assert sample("faasci_runs_stuck_total", service="metrics-stuck", stage="unit",
                  kind="lost") == 1  # fmt: skip
    assert sample("faasci_runs_stuck_total", service="metrics-stuck", stage="start",
                  kind="handoff") == 1  # fmt: skip


def test_the_queue_backlog_is_read_at_scrape_time():
    """The collector reports what the queue says when scraped, and only `up 0` when it
    cannot be read."""
    queue = {"answer": (7, 2)}

    def read():
        if isinstance(queue["answer"], Exception):
            raise queue["answer"]
        return queue["answer"]

    registry = CollectorRegistry()
    registry.register(metrics.QueueBacklog(read))
    assert registry.get_sample_value("faasci_queue_pending_messages") == 7
    assert registry.get_sample_value("faasci_queue_in_progress_messages") == 2
    assert registry.get_sample_value("faasci_queue_up") == 1
    queue["answer"] = ConnectionError("NATS away")
    text = generate_latest(registry).decode()
    assert "faasci_queue_up 0.0" in text and "faasci_queue_pending_messages" not in text


def test_a_failing_hook_never_fails_the_stage(caplog):
    """A hook given something it cannot measure logs the error and returns: the stage goes on."""
    metrics.stage_finished(object(), "lint", object())
    metrics.stage_started(None, "lint", None)
    assert "metrics: stage_finished failed" in caplog.text


def test_metrics_off_records_nothing(monkeypatch):
    """FAASCI_METRICS=off (the benchmark's "without" side) makes every hook a no-op, while
    a Slack delivery still goes out."""
    assert not metrics.enabled({"FAASCI_METRICS": "off"}) and metrics.enabled({})
    monkeypatch.setattr(metrics, "ENABLED", False)
    run = new_run("metrics-off")
    taken = runs.claim(run, "lint", None, "w")
    metrics.stage_started(run, "lint", taken)
    runs.finish(run, "lint", 1, status="passed", exit_code=0)
    metrics.stage_finished(run, "lint", run.stage("lint").attempts[0])
    metrics.budget_used("metrics-off", 0.9)
    sent = sample("faasci_alert_deliveries_total", outcome="sent")
    assert metrics.alert_delivery(lambda: "ts") == "ts"
    assert sample("faasci_alert_deliveries_total", outcome="sent") == sent
    assert "metrics-off" not in generate_latest(REGISTRY).decode()
