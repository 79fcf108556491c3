"""Run records and their pure transitions: new_run, claim, finish."""

import json
from datetime import UTC, datetime

import pytest

from faasci import pipeline, runs
from faasci.api import RUN_ID_RE
from faasci.errors import Conflict

PIPELINE = """\
service: inventory
stages:
  lint: {run: [ruff check .]}
  unit: {run: [pytest], retries: 2}
  build: {run: [make]}
"""


@pytest.fixture
def run() -> runs.Run:
    p = pipeline.parse(PIPELINE, "svc")
    return runs.new_run(p, repo="/src/inventory", ref="main", commit="a" * 40, source="/src/inv")


def passed(run, stage, number):
    return runs.finish(run, stage, number, passed=True, exit_code=0)


def test_new_run_queues_the_first_stage_only():
    """A new run is queued with its first stage queued and the rest pending."""
    p = pipeline.parse(PIPELINE, "svc")
    run = runs.new_run(p, repo="/r", ref="main", commit="c" * 40, source="/r")
    assert run.status == "queued"
    assert run.service == "inventory"
    assert [(s.name, s.status) for s in run.stages] == [
        ("lint", "queued"),
        ("unit", "pending"),
        ("build", "pending"),
    ]
    assert run.started_at is None and run.finished_at is None
    assert RUN_ID_RE.match(run.id)


def test_new_run_with_only_one_stage():
    """`only` makes a run of that single stage, queued."""
    p = pipeline.parse(PIPELINE, "svc")
    run = runs.new_run(p, only="build", repo="/r", ref="main", commit="c" * 40, source="/r")
    assert [(s.name, s.status) for s in run.stages] == [("build", "queued")]


def test_claim_takes_attempt_one_and_marks_running(run):
    """Claiming the first stage takes attempt 1 and starts the stage and the run."""
    attempt = runs.claim(run, "lint", 1, "worker-a")
    assert attempt.number == 1
    assert attempt.worker == "worker-a"
    assert attempt.status == "running"
    assert run.stage("lint").status == "running"
    assert run.stage("lint").attempts == [attempt]
    assert run.status == "running"
    assert run.started_at == attempt.started_at


def test_claim_without_a_number_takes_the_next_attempt(run):
    """claim(..., None) takes the stage's next attempt."""
    assert runs.claim(run, "lint", None, "w").number == 1


def test_second_claim_of_the_same_attempt_conflicts(run):
    """A duplicate delivery of attempt 1 finds it taken: Conflict, nothing recorded twice."""
    runs.claim(run, "lint", 1, "worker-a")
    with pytest.raises(Conflict) as caught:
        runs.claim(run, "lint", 1, "worker-b")
    assert caught.value.status == 409
    assert [a.worker for a in run.stage("lint").attempts] == ["worker-a"]


def test_claim_of_an_old_attempt_after_a_retry_conflicts(run):
    """Once attempt 2 is queued, a late duplicate of attempt 1 is refused."""
    runs.claim(run, "lint", 1, "w")
    runs.finish(run, "lint", 1, passed=False, exit_code=None, reason="timeout")
    with pytest.raises(Conflict) as caught:
        runs.claim(run, "lint", 1, "late-duplicate")
    assert caught.value.field == "attempt"
    assert runs.claim(run, "lint", 2, "w").number == 2


def test_claim_of_a_pending_stage_conflicts(run):
    """A stage that is not queued yet cannot be claimed."""
    with pytest.raises(Conflict):
        runs.claim(run, "unit", 1, "w")


def test_claim_of_an_unknown_stage_conflicts(run):
    """A stage the run does not have is a Conflict naming `stage`."""
    with pytest.raises(Conflict) as caught:
        runs.claim(run, "deploy", 1, "w")
    assert caught.value.field == "stage"


def test_finish_passed_queues_and_returns_the_next_stage(run):
    """A passed attempt passes its stage and queues the next one."""
    runs.claim(run, "lint", 1, "w")
    following = passed(run, "lint", 1)
    assert following.stage == "unit"
    assert following.attempt == 1
    assert not following.run_finished
    lint = run.stage("lint")
    assert lint.status == "passed"
    assert lint.attempts[0].status == "passed"
    assert lint.attempts[0].exit_code == 0
    assert lint.duration_s is not None and lint.duration_s >= 0
    assert run.stage("unit").status == "queued"
    assert run.stage("build").status == "pending"
    assert run.status == "running"


def test_last_stage_passed_passes_the_run_with_a_duration(run):
    """When the last stage passes the run is passed, finished and timed."""
    for name in ("lint", "unit", "build"):
        runs.claim(run, name, 1, "w")
        following = passed(run, name, 1)
    assert following.stage is None
    assert following.run_finished
    assert run.status == "passed"
    assert run.finished
    assert run.finished_at is not None and run.finished_at >= run.created_at
    assert run.duration_s is not None and run.duration_s >= 0
    assert [s.status for s in run.stages] == ["passed", "passed", "passed"]


def test_failure_not_in_retry_on_fails_the_run_and_skips_later_stages(run):
    """A failing test (reason `exit`) is not retried: run failed, later stages skipped."""
    runs.claim(run, "lint", 1, "w")
    following = runs.finish(
        run, "lint", 1, passed=False, exit_code=1, reason="exit", error="ruff found 3 errors"
    )
    assert following.stage is None
    assert following.run_finished
    assert run.status == "failed"
    assert run.duration_s is not None
    assert [(s.name, s.status) for s in run.stages] == [
        ("lint", "failed"),
        ("unit", "skipped"),
        ("build", "skipped"),
    ]
    attempt = run.stage("lint").attempts[0]
    assert (attempt.status, attempt.exit_code, attempt.reason, attempt.error) == (
        "failed",
        1,
        "exit",
        "ruff found 3 errors",
    )


def test_retryable_failure_queues_the_same_stage_with_the_next_attempt(run):
    """A timeout with retries left queues the same stage again as attempt n+1."""
    runs.claim(run, "lint", 1, "w")
    following = runs.finish(run, "lint", 1, passed=False, exit_code=None, reason="timeout")
    assert (following.stage, following.attempt, following.run_finished) == ("lint", 2, False)
    assert run.stage("lint").status == "queued"
    assert run.stage("lint").attempts[0].status == "failed"
    assert run.status == "running"
    assert run.stage("unit").status == "pending"


def test_retries_run_out_after_one_plus_retries_attempts(run):
    """unit has retries: 2, so its third infra failure fails the run."""
    runs.claim(run, "lint", 1, "w")
    passed(run, "lint", 1)
    outcomes = []
    for number in (1, 2, 3):
        taken = runs.claim(run, "unit", None, "w")
        assert taken.number == number
        outcomes.append(
            runs.finish(run, "unit", number, passed=False, exit_code=None, reason="infra")
        )
    assert [(n.stage, n.attempt) for n in outcomes[:2]] == [("unit", 2), ("unit", 3)]
    assert outcomes[2].stage is None and outcomes[2].run_finished
    assert run.status == "failed"
    assert run.stage("unit").status == "failed"
    assert len(run.stage("unit").attempts) == 3
    assert run.stage("build").status == "skipped"
    with pytest.raises(Conflict):
        runs.claim(run, "unit", 4, "w")


def test_a_pass_on_retry_moves_on(run):
    """A retried stage that passes on attempt 2 queues the next stage."""
    runs.claim(run, "lint", 1, "w")
    runs.finish(run, "lint", 1, passed=False, exit_code=None, reason="infra")
    runs.claim(run, "lint", 2, "w")
    following = passed(run, "lint", 2)
    assert following.stage == "unit"
    assert [a.status for a in run.stage("lint").attempts] == ["failed", "passed"]
    assert run.stage("lint").status == "passed"


def test_json_round_trip_keeps_utc_times_ending_in_z(run):
    """A run survives JSON unchanged; its times are ISO 8601 UTC ending in `Z`."""
    runs.claim(run, "lint", 1, "w")
    passed(run, "lint", 1)
    text = run.model_dump_json()
    data = json.loads(text)
    times = [data["created_at"], data["started_at"], data["stages"][0]["finished_at"]]
    times.append(data["stages"][0]["attempts"][0]["started_at"])
    for value in times:
        assert value.endswith("Z"), value
        parsed = datetime.fromisoformat(value)
        assert parsed.utcoffset().total_seconds() == 0
    again = runs.Run.model_validate_json(text)
    assert again == run
    assert again.created_at.tzinfo is not None
    assert again.created_at == run.created_at
    assert again.pipeline.stage_names() == ["lint", "unit", "build"]
    assert runs.now().tzinfo == UTC
