"""Stages under the community queue-worker's semantics: it redelivers a message after
`ack_wait`, and it does not de-duplicate by X-Call-Id. Every stage call that arrives twice
(after the run ended, while the stage runs, or an earlier attempt after a retry) must be
harmless: answered 409, nothing run again, the record unchanged."""

import time
import uuid
from collections import Counter

from conftest import wait_for_run

from faasci import STAGES


def redeliver(gateway, callbacks, stage: str, run_id: str, attempt: int) -> None:
    """The same hand-off body again, with a call id of its own (no de-duplication)."""
    gateway.call_async(stage, {"run_id": run_id, "attempt": attempt},
                       call_id=str(uuid.uuid4()), callback_url=callbacks[0])  # fmt: skip


def statuses(callbacks, count: int) -> list[int]:
    """The X-Function-Status of the next `count` callbacks."""
    got = [callbacks[1].get(timeout=120) for _ in range(count)]
    return sorted(int(headers["X-Function-Status"]) for headers, _ in got)


def marking_pipeline(make_repo, markers, unit: str = "true") -> str:
    stages = "".join(
        f'  {stage}:\n    run: ["{unit if stage == "unit" else "true"}; '
        f'echo $FAASCI_STAGE $FAASCI_ATTEMPT >> {markers}"]\n'
        f"    retries: 2\n    retry_on: [exit]\n    backoff: {{initial_s: 0.2}}\n"
        for stage in STAGES
    )
    return make_repo({".faasci.yml": f"service: redelivery\nstages:\n{stages}"})


def test_every_stage_delivered_again_after_the_run_runs_nothing(gateway, make_repo, outside,
                                                               callback_receiver):  # fmt: skip
    """Each of the six hand-offs delivered twice more after the run passed: all 409."""
    markers = outside / "markers"
    repo = marking_pipeline(make_repo, markers)
    run_id = gateway.call("runs", {"repo": str(repo)}).json()["id"]
    final = wait_for_run(gateway, run_id)
    assert final["status"] == "passed"
    for stage in STAGES:
        for _ in range(2):
            redeliver(gateway, callback_receiver, stage, run_id, 1)
    assert statuses(callback_receiver, 2 * len(STAGES)) == [409] * (2 * len(STAGES))
    assert Counter(markers.read_text().splitlines()) == {f"{s} 1": 1 for s in STAGES}
    assert gateway.call("runs", method="GET", path=run_id).json() == final


def test_duplicates_while_a_stage_runs_are_refused(gateway, make_repo, outside, callback_receiver):
    """Two more deliveries of a running stage's attempt: 409, the stage and what follows it
    run once, the run passes."""
    markers = outside / "markers"
    started = outside / "started"
    repo = marking_pipeline(make_repo, markers, unit=f"touch {started}; sleep 3")
    run_id = gateway.call("runs", {"repo": str(repo)}).json()["id"]
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "unit never started"
        time.sleep(0.05)
    redeliver(gateway, callback_receiver, "unit", run_id, 1)
    redeliver(gateway, callback_receiver, "unit", run_id, 1)
    assert statuses(callback_receiver, 2) == [409, 409]
    final = wait_for_run(gateway, run_id)
    assert final["status"] == "passed"
    assert [len(s["attempts"]) for s in final["stages"]] == [1] * len(STAGES)
    assert Counter(markers.read_text().splitlines()) == {f"{s} 1": 1 for s in STAGES}


def test_a_late_delivery_of_an_earlier_attempt_is_harmless(gateway, make_repo, outside,
                                                          callback_receiver):  # fmt: skip
    """Attempt 1 of a stage that failed and passed on attempt 2, delivered again: 409."""
    markers = outside / "markers"
    flag = outside / "failed-once"
    repo = marking_pipeline(make_repo, markers,
                            unit=f"test -e {flag} || {{ touch {flag}; exit 1; }}")  # fmt: skip
    run_id = gateway.call("runs", {"repo": str(repo)}).json()["id"]
    final = wait_for_run(gateway, run_id)
    unit = next(s for s in final["stages"] if s["name"] == "unit")
    assert final["status"] == "passed"
    assert [a["status"] for a in unit["attempts"]] == ["failed", "passed"]
    for attempt in (1, 2, 1):
        redeliver(gateway, callback_receiver, "unit", run_id, attempt)
    redeliver(gateway, callback_receiver, "integration", run_id, 1)
    assert statuses(callback_receiver, 4) == [409] * 4
    assert gateway.call("runs", method="GET", path=run_id).json() == final
    assert Counter(markers.read_text().splitlines())["unit 2"] == 1
    assert Counter(markers.read_text().splitlines())["integration 1"] == 1
