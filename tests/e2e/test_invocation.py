"""The OpenFaaS contract of the local stack: sync and async invocation, callbacks, cron."""

import json
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import pytest
from conftest import ROOT, copy_sample, wait_for_run
from croniter import croniter

from faasci import STAGES, trigger
from faasci import stack as stack_file
from faasci.local.cron import CRON_HEADERS, Scheduler, invoke_through_gateway


@pytest.fixture(scope="module")
def built_alone(gateway, tmp_path_factory, engine_with_base):
    """One commit of the example, its build stage invoked alone: (repository, its result)."""
    repo = copy_sample(tmp_path_factory.mktemp("alone"))
    resp = gateway.call("build", {"repo": str(repo), "ref": "main"})
    assert resp.status_code == 200, resp.text
    return repo, resp.json()


@pytest.mark.parametrize("stage", STAGES)
def test_any_stage_runs_alone_over_http(gateway, built_alone, stage):
    """POST /function/<stage> with a repo runs just that stage and answers its result; a
    stage after build acts on the image the commit's build pushed, by digest."""
    repo, build = built_alone
    if stage == "build":
        result = build
    else:
        resp = gateway.call(stage, {"repo": str(repo), "ref": "main"})
        assert resp.status_code == 200, resp.text
        result = resp.json()
    assert result["stage"] == stage and result["status"] == "passed", result["log_tail"]
    assert result["exit_code"] == 0 and result["duration_s"] > 0
    assert result["next"] is None and result["run_status"] == "passed"
    assert urlparse(result["log"]).path.endswith(f"/{stage}/1")
    assert "[faas-ci]" in result["log_tail"]
    log = gateway.call("pipeline-log", method="GET", path=f"{result['run_id']}/{stage}/1")
    assert log.status_code == 200 and log.text.endswith(result["log_tail"])
    image = build["image"]
    assert "@sha256:" in image and "note" not in result
    if stage == "integration":
        assert f"in {image}" in log.text
    if stage == "promote":
        assert result["promotion"]["environment"] == "staging"
        assert result["promotion"]["image"] == image
    if stage == "deploy":
        assert result["deployment"]["image"] == image


def test_stage_continues_an_existing_run(gateway, client_settings, sample_repo):
    """{"run_id"} runs the run's queued stage over HTTP; the rest of the run follows."""
    run = trigger.start_run(str(sample_repo), "main", dispatch_first=False)
    resp = gateway.call("lint", {"run_id": run.id})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "passed" and resp.json()["next"] == "unit"
    final = wait_for_run(gateway, run.id)
    assert final["status"] == "passed"
    assert [len(s["attempts"]) for s in final["stages"]] == [1] * 6
    again = gateway.call("lint", {"run_id": run.id})
    assert again.status_code == 409 and "already passed" in again.json()["error"]


def test_a_duplicate_delivery_does_not_run_a_stage_twice(gateway, sample_repo):
    """Invoking a stage's attempt that was already taken is refused with 409."""
    run = gateway.call("runs", {"repo": str(sample_repo)}).json()
    final = wait_for_run(gateway, run["id"])
    dup = gateway.call("unit", {"run_id": run["id"], "attempt": 1})
    assert dup.status_code == 409
    after = gateway.call("runs", method="GET", path=run["id"]).json()
    assert [len(s["attempts"]) for s in after["stages"]] == [1] * 6
    assert after["stages"] == final["stages"]


def test_cron_connector_request_starts_the_scheduled_runs(gateway, scheduled_repo):
    """The exact cron-connector request (empty body, X-Topic, X-Connector) is handled."""
    resp = gateway.call("webhook", b"", headers=CRON_HEADERS)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["trigger"] == "cron" and body["failed"] == []
    (run_id,) = body["started"]
    run = wait_for_run(gateway, run_id)
    assert run["trigger"] == "cron" and run["repo"] == str(scheduled_repo)
    assert run["status"] == "passed"


def test_cron_schedule_from_the_annotations_fires(stack, gateway):
    """The scheduler reads stack.yml's annotations and, when due, invokes in cron form."""
    schedules = {n: f.schedule for n, f in stack_file.load(ROOT / "stack.yml").functions.items()
                 if f.schedule}  # fmt: skip
    assert schedules == {"webhook": "0 2 * * *", "cache-invalidator": "30 3 * * *",
                         "secrets": "0 4 */2 * *", "registry-retention": "0 5 * * *"}  # fmt: skip
    clock = [datetime(2026, 1, 1, 1, 59, tzinfo=UTC)]
    fired = []
    scheduler = Scheduler(schedules, fired.append, now=lambda: clock[0])
    assert scheduler.due() == []
    clock[0] += timedelta(minutes=1)
    (name,) = scheduler.due()
    # The request carries no credentials (as cron-connector's): the function runs the round
    # only inside its slot, so now, outside it, the gateway passes on the function's 403.
    slot = croniter(schedules[name], datetime.now(UTC)).get_prev(datetime)
    in_slot = datetime.now(UTC) - slot < timedelta(minutes=9)
    status = invoke_through_gateway(stack.gateway_url, name)
    assert status == (200 if in_slot else 403)


def test_async_invocation_answers_202_and_calls_back(gateway, sample_repo, callback_receiver):
    """/async-function answers 202 at once; the callback carries the result and headers."""
    url, received = callback_receiver
    call_id = gateway.call_async("lint", {"repo": str(sample_repo)}, callback_url=url)
    headers, body = received.get(timeout=60)
    assert headers["X-Call-Id"] == call_id
    assert headers["X-Function-Name"] == "lint"
    assert headers["X-Function-Status"] == "200"
    assert float(headers["X-Duration-Seconds"]) > 0
    assert json.loads(body)["status"] == "passed"


def test_system_functions_lists_the_stack(gateway):
    """/system/functions lists every function of stack.yml, ready, with its annotations
    (and whatever deploy stages deployed beside them)."""
    listed = {f["name"]: f for f in gateway.session.get(f"{gateway.url}/system/functions").json()}
    ours = {"webhook", "runs", "pipeline-log", "timers", "notifier", "cache-invalidator",
            "secrets", "registry-retention", *STAGES}  # fmt: skip
    assert ours <= set(listed)
    assert all(listed[name]["availableReplicas"] == 1 for name in ours)
    assert listed["webhook"]["annotations"]["topic"] == "cron-function"
