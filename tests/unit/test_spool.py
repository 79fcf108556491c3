"""Results kept through a store outage: the spool's retries and bounds, and a lease that does
not declare a worker lost for silence a NATS outage imposed (faasci.spool, stage.on_lease_timer)."""

import shutil
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest

from faasci import pipeline, runs, spool, stage
from faasci.errors import NotFound

PIPELINE = "service: inventory\nstages:\n  lint: {run: [ruff check .], retries: 1}\n"


def test_persist_tries_again_until_it_succeeds(monkeypatch):
    monkeypatch.setattr(spool.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("store down")
        return "stored"

    assert spool.persist("storing", flaky, time.monotonic() + 60) == "stored"
    assert len(calls) == 4


def test_persist_gives_up_past_its_deadline_with_the_cause(monkeypatch):
    monkeypatch.setattr(spool.time, "sleep", lambda s: None)

    def down():
        raise ConnectionError("store down")

    with pytest.raises(spool.GaveUp) as given_up:
        spool.persist("storing", down, time.monotonic())  # tried once
    assert isinstance(given_up.value.__cause__, ConnectionError)


def test_persist_raises_a_user_error_at_once():
    def gone():
        raise NotFound("no run")

    with pytest.raises(NotFound):
        spool.persist("recording", gone, time.monotonic() + 60)


def test_sizing_the_spool_survives_entries_removed_meanwhile(tmp_path, monkeypatch):
    """Other attempts release their entries while one sizes the spool (100 runs at once)."""
    monkeypatch.setattr(spool, "directory", lambda: tmp_path / "spool")
    stop, errors = threading.Event(), []

    def churn():
        while not stop.is_set():
            for n in range(20):
                entry = tmp_path / "spool" / f"r-unit-{n}"
                entry.mkdir(parents=True, exist_ok=True)
                (entry / "stage.log").write_bytes(b"x")
            for n in range(20):
                shutil.rmtree(tmp_path / "spool" / f"r-unit-{n}", ignore_errors=True)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        for _ in range(2000):
            try:
                assert 0 <= spool.used_bytes() <= 20
            except OSError as e:
                errors.append(e)
    finally:
        stop.set()
        churner.join()
    assert errors == []


def test_kept_moves_the_log_out_and_knows_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "directory", lambda: tmp_path / "spool")
    log = tmp_path / "work" / "stage.log"
    log.parent.mkdir()
    log.write_bytes(b"x" * 100)
    monkeypatch.setenv("FAASCI_SPOOL_MAX_BYTES", "10000")
    kept = spool.Kept("r-lint-1", log, {"exit_code": 0})
    assert not log.exists() and kept.log.read_bytes() == b"x" * 100
    assert not kept.over_bound
    kept.release()
    assert not kept.dir.exists()
    log.write_bytes(b"x" * 20000)
    assert spool.Kept("r-lint-2", log, {}).over_bound


class FakeStore:
    def __init__(self, run):
        self.run, self.before_write = run, None

    def get(self, run_id):
        return self.run.model_copy(deep=True)

    def update(self, run_id, change, event):
        current = self.run.model_copy(deep=True)
        if self.before_write:
            self.before_write(current)
        result = change(current)
        self.run = current
        return current, result


@pytest.fixture
def leased(monkeypatch):
    """A running lint attempt whose heartbeat has been silent for 150 s."""
    run = runs.new_run(pipeline.parse(PIPELINE, "svc"), repo="/r", ref="main",
                       commit="a" * 40, source="/r")  # fmt: skip
    runs.claim(run, "lint", 1, "w")
    run.stage("lint").attempts[0].heartbeat_at = runs.now() - timedelta(seconds=150)
    store, bus = FakeStore(run), SimpleNamespace(up_since=time.monotonic() - 1000)
    monkeypatch.setattr(stage.services, "run_store", lambda: store)
    monkeypatch.setattr(stage.services, "bus", lambda: bus)
    monkeypatch.setattr(stage, "guard_handoff", lambda *a: None)
    handed = []
    monkeypatch.setattr(stage, "hand_on", lambda run_id, following, **k: handed.append(following))
    return store, bus, handed


TIMER = {"run_id": "x", "stage": "lint", "attempt": 1}


def test_a_silent_worker_is_lost(leased):
    store, _, handed = leased
    assert stage.on_lease_timer(TIMER) is None
    lost = store.run.stage("lint").attempts[0]
    assert (lost.status, lost.reason) == ("failed", "infra") and handed


def test_silence_while_nats_was_away_is_not_the_workers(leased):
    """NATS back 5 s ago: the worker gets LEASE_S from then to speak; nothing recorded."""
    store, bus, handed = leased
    bus.up_since = time.monotonic() - 5
    again = stage.on_lease_timer(TIMER)
    assert again == pytest.approx(stage.LEASE_S - 5 + 1, abs=1)
    assert store.run.stage("lint").attempts[0].status == "running" and not handed


def test_a_heartbeat_landing_first_wins_over_the_lease(leased):
    """Compare-and-set: the worker wrote (a heartbeat) between the timer's read and write."""
    store, _, handed = leased

    def beat(run):
        run.stage("lint").attempts[0].heartbeat_at = runs.now()

    store.before_write = beat
    assert stage.on_lease_timer(TIMER) == stage.LEASE_S
    assert store.run.stage("lint").attempts[0].status == "running" and not handed


def test_the_workers_record_landing_first_wins_over_the_lease(leased):
    store, _, handed = leased

    def passed(run):
        runs.finish(run, "lint", 1, status="passed", exit_code=0)

    store.before_write = passed
    stage.on_lease_timer(TIMER)
    assert store.run.stage("lint").attempts[0].status == "passed"
    assert store.run.status == "passed"


@pytest.mark.parametrize(("ended_s_ago", "unit_claimed", "invoked", "again"), [
    (stage.HANDOFF_GRACE_S + 10, False, True, stage.HANDOFF_GRACE_S),  # lost: invoked again
    (10, False, False, stage.HANDOFF_GRACE_S - 10 + 1),  # not overdue yet: look then
    (stage.HANDOFF_GRACE_S + 10, True, False, None),  # claimed: the guard is done
])  # fmt: skip
def test_an_ended_attempts_lease_timer_guards_its_hand_off(
    monkeypatch, ended_s_ago, unit_claimed, invoked, again
):
    """One timer per attempt: once lint has ended, its lease timer invokes unit while it is
    owed and unclaimed HANDOFF_GRACE_S after lint's end."""
    two = PIPELINE + "  unit: {run: [pytest]}\n"
    run = runs.new_run(pipeline.parse(two, "svc"), repo="/r", ref="main", commit="a" * 40,
                       source="/r")  # fmt: skip
    runs.claim(run, "lint", 1, "w")
    runs.finish(run, "lint", 1, status="passed", exit_code=0)
    run.stage("lint").attempts[0].finished_at = runs.now() - timedelta(seconds=ended_s_ago)
    if unit_claimed:
        runs.claim(run, "unit", 1, "w2")
    monkeypatch.setattr(stage.services, "run_store", lambda: FakeStore(run))
    monkeypatch.setattr(stage.caps, "waiting", lambda *a: False)
    dispatched = []
    monkeypatch.setattr(stage, "dispatch", lambda *a, **k: dispatched.append(a[:3]))
    after = stage.on_lease_timer({"run_id": run.id, "stage": "lint", "attempt": 1})
    assert (after is None) if again is None else after == pytest.approx(again, abs=1)
    assert dispatched == ([(run.id, "unit", 1)] if invoked else [])


def test_a_starting_function_removes_attempt_folders_a_dead_process_left(tmp_path):
    """Attempt folders (overlay work folders of mode 0 among them) go; the spool and
    anything else stay."""
    from dataclasses import replace

    from faasci import settings

    dead = tmp_path / "20261127-120000-abcdef-unit-2"
    (dead / "overlay" / "work").mkdir(parents=True)
    (dead / "overlay" / "work" / "work").mkdir(mode=0)
    (tmp_path / "spool" / "20261127-120000-abcdef-unit-1").mkdir(parents=True)
    (tmp_path / "resolve-x1y2").mkdir()
    settings.configure(replace(settings.Settings(), workdir=tmp_path))
    try:
        stage.sweep_workdirs()
    finally:
        settings.configure(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolve-x1y2", "spool"]
