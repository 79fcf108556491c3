"""Run records and their pure transitions: new_run, claim, finish."""

import json
from datetime import UTC, datetime

import pytest

from faasci import pipeline, runs
from faasci.api import RUN_ID_RE
from faasci.errors import Conflict, NotFound, Unprocessable

PIPELINE = """\
service: inventory
stages:
  lint: {run: [ruff check .], retry_on: [timeout, infra]}
  unit: {run: [pytest], retries: 2}
  build: {run: [make]}
"""


@pytest.fixture
def run() -> runs.Run:
    p = pipeline.parse(PIPELINE, "svc")
    return runs.new_run(p, repo="/src/inventory", ref="main", commit="a" * 40, source="/src/inv")


def passed(run, stage, number):
    return runs.finish(run, stage, number, status="passed", exit_code=0)


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
    runs.finish(run, "lint", 1, status="failed", exit_code=None, reason="timeout")
    with pytest.raises(Conflict) as caught:
        runs.claim(run, "lint", 1, "late-duplicate")
    assert caught.value.field == "attempt"
    assert runs.claim(run, "lint", 2, "w").number == 2


def test_claim_of_a_pending_stage_conflicts(run):
    """A stage that is not queued yet cannot be claimed."""
    with pytest.raises(Conflict):
        runs.claim(run, "unit", 1, "w")


def test_claim_of_an_unknown_stage_is_not_found(run):
    """A stage the run does not have is NotFound (404) naming `stage`."""
    with pytest.raises(NotFound) as caught:
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
    """A failing test (reason `exit`) where the pipeline narrows retry_on to timeout/infra is
    not retried: run failed, later stages skipped."""
    runs.claim(run, "lint", 1, "w")
    following = runs.finish(
        run, "lint", 1, status="failed", exit_code=1, reason="exit", error="ruff found 3 errors"
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


def test_a_failing_test_is_retried_by_default():
    """Without retry_on in the pipeline a non-zero exit is retried (the seed's three times),
    and only the fourth failure fails the run and asks for the one alert."""
    p = pipeline.parse("stages: {unit: {run: [pytest]}}\n", "svc")
    run = runs.new_run(p, repo="/src/inventory", ref="main", commit="a" * 40, source="/src/inv")
    for number in (1, 2, 3):
        runs.claim(run, "unit", number, "w")
        following = runs.finish(run, "unit", number, status="failed", exit_code=1, reason="exit")
        assert (following.stage, following.attempt, following.notify) == ("unit", number + 1, False)
        assert following.delay_s > 0 and run.status == "running"
    runs.claim(run, "unit", 4, "w")
    following = runs.finish(run, "unit", 4, status="failed", exit_code=1, reason="exit")
    assert following.notify and run.status == "failed" and len(run.stage("unit").attempts) == 4


def test_retryable_failure_queues_the_same_stage_with_the_next_attempt(run):
    """A timeout with retries left queues the same stage again as attempt n+1."""
    runs.claim(run, "lint", 1, "w")
    following = runs.finish(run, "lint", 1, status="failed", exit_code=None, reason="timeout")
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
            runs.finish(run, "unit", number, status="failed", exit_code=None, reason="infra")
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
    runs.finish(run, "lint", 1, status="failed", exit_code=None, reason="infra")
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


# Retries with back-off, lost workers, cancelling, and transitions applied twice.


def test_a_retry_waits_its_backoff(run):
    """A retryable failure queues the next attempt after the stage's back-off delay."""
    runs.claim(run, "lint", 1, "w")
    following = runs.finish(run, "lint", 1, status="failed", reason="timeout")
    assert following.stage == "lint" and following.attempt == 2
    assert 2.5 <= following.delay_s <= 5  # 5 s initial, jitter of up to half
    assert run.stage("lint").retry_at > run.stage("lint").attempts[0].finished_at


def test_backoff_is_exponential_capped_and_jittered():
    """Delays double from initial_s, stop at max_s, and jitter only shortens them."""
    b = pipeline.Backoff(initial_s=1, factor=2, max_s=5, jitter=0)
    assert [b.delay(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    jittered = pipeline.Backoff(initial_s=10, factor=2, max_s=100, jitter=0.5)
    delays = {jittered.delay(1) for _ in range(50)}
    assert all(5 <= d <= 10 for d in delays) and len(delays) > 1


def test_backoff_in_the_pipeline_file_names_a_bad_field():
    """An unknown backoff key is refused with its field named."""
    text = "stages:\n  unit:\n    run: [pytest]\n    backoff: {initial: 3}\n"
    with pytest.raises(Unprocessable) as caught:
        pipeline.parse(text, "svc")
    assert caught.value.field == "stages.unit.backoff.initial"


def test_a_failed_run_asks_for_one_alert(run):
    """When retries run out the run fails, its alert is pending, and the notifier is asked."""
    runs.claim(run, "lint", 1, "w")
    following = runs.finish(run, "lint", 1, status="failed", reason="exit")
    assert following.notify and following.run_finished
    assert run.alert.status == "pending"
    again = runs.finish(run, "lint", 1, status="failed", reason="exit")
    assert again.notify and run.alert.status == "pending"  # a repeat changes nothing


def test_claim_repeated_by_its_own_worker_is_the_same_attempt(run):
    """A claim written twice (an ambiguous write retried) returns the worker's attempt."""
    first = runs.claim(run, "lint", 1, "w1")
    assert runs.claim(run, "lint", 1, "w1") is first
    with pytest.raises(Conflict):
        runs.claim(run, "lint", 1, "w2")
    assert len(run.stage("lint").attempts) == 1


def test_finish_applied_twice_hands_on_once(run):
    """A repeated finish leaves the record alone and says the same thing should follow."""
    runs.claim(run, "lint", 1, "w")
    first = passed(run, "lint", 1)
    snapshot = run.model_copy(deep=True)
    assert passed(run, "lint", 1) == first and run == snapshot


def test_a_lost_worker_fails_its_attempt_as_infra_and_is_retried(run):
    """lose() records the attempt failed (infra) and queues a retry, as infra is retryable."""
    runs.claim(run, "lint", 1, "dead")
    following = runs.lose(run, "lint", 1, 42)
    attempt = run.stage("lint").attempts[0]
    assert attempt.status == "failed" and attempt.reason == "infra"
    assert "no heartbeat for 42s" in attempt.error
    assert following.stage == "lint" and following.attempt == 2
    assert runs.heartbeat(run, "lint", 1) is False  # the old worker learns it lost


def test_cancel_stops_queued_stages_and_the_running_one(run):
    """Cancelling ends the run; the running attempt is recorded cancelled when it stops."""
    runs.claim(run, "lint", 1, "w")
    runs.cancel(run)
    assert run.status == "cancelled" and run.finished_at is not None
    assert [s.status for s in run.stages] == ["running", "cancelled", "cancelled"]
    assert runs.heartbeat(run, "lint", 1) is False
    following = runs.finish(run, "lint", 1, status="cancelled", reason="cancelled")
    assert following.run_finished and not following.stage
    assert run.stage("lint").status == "cancelled"
    with pytest.raises(Conflict):
        runs.cancel(run)
