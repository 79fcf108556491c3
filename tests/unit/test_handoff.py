"""What a hand-off still owes, judged from the run record alone (runs.owed_after): the
hand-off guard invokes it again until it is claimed."""

import pytest

from faasci import pipeline, runs

PIPELINE = """\
service: inventory
stages:
  lint: {run: [ruff check .], retries: 0}
  unit: {run: [pytest], retries: 2, retry_on: [infra], backoff: {initial_s: 10}}
"""


@pytest.fixture
def run() -> runs.Run:
    p = pipeline.parse(PIPELINE, "svc")
    return runs.new_run(p, repo="/src/inventory", ref="main", commit="a" * 40, source="/src/inv")


def test_a_new_run_owes_its_first_stage_until_claimed(run):
    """The run's start owes lint's first attempt, since the run was created; claimed: nothing."""
    owed = runs.owed_after(run, None, 0)
    assert (owed.function, owed.attempt, owed.since) == ("lint", 1, run.created_at)
    runs.claim(run, "lint", 1, "w")
    assert runs.owed_after(run, None, 0) == runs.Owed()


def test_a_running_attempt_is_not_recorded_yet(run):
    """Before its end is written, the guard waits (the worker or its lease records it)."""
    runs.claim(run, "lint", 1, "w")
    assert runs.owed_after(run, "lint", 1).unrecorded


def test_a_passed_stage_owes_the_next_stage_until_claimed(run):
    """Passed lint owes unit's attempt 1 since lint's end; once unit is claimed, nothing."""
    runs.claim(run, "lint", 1, "w")
    runs.finish(run, "lint", 1, status="passed", exit_code=0)
    ended = run.stage("lint").attempts[0]
    owed = runs.owed_after(run, "lint", 1)
    assert (owed.function, owed.attempt, owed.since) == ("unit", 1, ended.finished_at)
    runs.claim(run, "unit", 1, "w")
    assert runs.owed_after(run, "lint", 1) == runs.Owed()
    # unit failing and queued for a retry is unit's own guard's business, not lint's
    runs.finish(run, "unit", 1, status="failed", reason="infra")
    assert runs.owed_after(run, "lint", 1) == runs.Owed()


def test_a_retry_is_owed_from_its_back_off(run):
    """A failed attempt owes the next one, due when its back-off ends (retry_at)."""
    runs.claim(run, "lint", 1, "w")
    runs.finish(run, "lint", 1, status="passed", exit_code=0)
    runs.claim(run, "unit", 1, "w")
    runs.finish(run, "unit", 1, status="failed", reason="infra")
    owed = runs.owed_after(run, "unit", 1)
    assert (owed.function, owed.attempt) == ("unit", 2)
    assert owed.since == run.stage("unit").retry_at > run.stage("unit").attempts[0].finished_at


def test_a_failed_run_owes_its_alert_until_a_notifier_takes_it(run):
    """The end of a failed run owes the notifier while its alert was never picked up."""
    runs.claim(run, "lint", 1, "w")
    runs.finish(run, "lint", 1, status="failed", exit_code=1, reason="exit")
    owed = runs.owed_after(run, "lint", 1)
    assert (owed.function, owed.since) == ("notifier", run.finished_at)
    run.alert.tries = 1  # a notifier took it: its own timers deliver it from there
    assert runs.owed_after(run, "lint", 1) == runs.Owed()


def test_a_cancelled_run_owes_nothing(run):
    """Cancelled mid-attempt (the attempt still running): neither it nor the start owes."""
    runs.claim(run, "lint", 1, "w")
    runs.cancel(run)
    assert runs.owed_after(run, "lint", 1) == runs.Owed()
    assert runs.owed_after(run, None, 0) == runs.Owed()


def test_a_passed_run_owes_nothing(run):
    """The last stage passed: the run is over, nothing follows."""
    for stage in ("lint", "unit"):
        runs.claim(run, stage, 1, "w")
        runs.finish(run, stage, 1, status="passed", exit_code=0)
    assert run.status == "passed"
    assert runs.owed_after(run, "unit", 1) == runs.Owed()
