"""Results never lost to a store outage, on a local stack of its own: NATS stopped for 150 s,
then S3 stopped, each across a stage's end. The worker keeps the attempt's outcome and log
(faasci.spool) and its lease until the store is back: the passed attempt is recorded
`passed` once, not rerun, and its log is whole. A worker killed meanwhile leaves them in
its spool, and the function's next process stores and records them."""

import os
import signal
import time
from collections import Counter

import pytest
from conftest import ROOT, stack_ports, start_run, started

from faasci.invoke import Gateway
from faasci.local import oidc, processes, services
from faasci.local.config import LocalConfig

# The ports of test_local_stack's second stack: these tests never run at the same time.
OUTAGE_STACK = stack_ports(29080, 25222, 29333)
NATS_OUTAGE_S = 150
S3_OUTAGE_S = 20


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    """(config, gateway client) of a stack of this module's own; stopped afterwards."""
    home = tmp_path_factory.mktemp("outage") / "home"
    env = {**OUTAGE_STACK, "FAASCI_HOME": str(home), "FAASCI_STACK": str(ROOT / "stack.yml")}
    saved = {k: os.environ.get(k) for k in [*env, "FAASCI_SECRETS_DIR"]}
    os.environ.pop("FAASCI_SECRETS_DIR", None)
    os.environ.update(env)
    cfg = LocalConfig.from_env()
    try:
        with started(cfg):
            yield cfg, Gateway(cfg.gateway_url, timeout=120,
                               token=lambda: oidc.token(cfg, "test-admin"))  # fmt: skip
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _finished(gateway, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        resp = gateway.call("runs", method="GET", path=run_id)
        if resp.status_code == 200 and resp.json()["status"] in ("passed", "failed", "cancelled"):
            return resp.json()
        assert time.monotonic() < deadline, f"run {run_id}: {resp.status_code} {resp.text[:200]}"
        time.sleep(0.5)


def _outage_across_lint_end(own_stack, make_repo, outside, part: str, outage_s: float,
                            kill_worker: bool = False) -> None:  # fmt: skip
    cfg, gateway = own_stack
    markers, ending = outside / "markers", outside / "lint-ending"
    repo = make_repo({".faasci.yml": f"""\
service: outage-{part}
stages:
  lint:
    run: ["echo $FAASCI_RUN_ID lint >> {markers}; touch {ending}; seq 1 2000; sleep 3; \
echo lint-last-line"]
  unit:
    run: ["echo $FAASCI_RUN_ID unit >> {markers}"]
"""})  # fmt: skip
    began = time.monotonic()
    run_id = start_run(gateway, repo)
    _wait(ending.exists, 90, "lint's last command")
    assert processes.stop(cfg.run, part)  # lint ends ~3 s from now, with `part` stopped
    if kill_worker:  # once lint's result waits in its spool: SIGKILL, then a new process
        spooled = lambda: any((cfg.workdir / "lint" / "spool").glob("*/outcome.json"))  # noqa: E731
        _wait(spooled, 30, "lint's result in its spool")
        worker = processes.pid_of(cfg.run, "fn-lint")
        os.kill(worker, signal.SIGKILL)
        _wait(lambda: processes.pid_of(cfg.run, "fn-lint") not in (None, worker), 30,
              "the gateway to start lint again")  # fmt: skip
    time.sleep(outage_s)
    start = services.start_nats if part == "nats" else services.start_s3
    assert start(cfg, {**os.environ, **cfg.env()})
    back_at = time.monotonic()

    run = _finished(gateway, run_id, timeout=180)
    assert run["status"] == "passed", run
    lint, unit = run["stages"]
    assert [a["status"] for a in lint["attempts"]] == ["passed"], lint["attempts"]
    assert [a["status"] for a in unit["attempts"]] == ["passed"]
    assert Counter(markers.read_text().splitlines()) == {f"{run_id} lint": 1, f"{run_id} unit": 1}
    # recorded only once the store was back: the worker held the result through the outage
    assert lint["attempts"][0]["duration_s"] >= outage_s - 5
    log = gateway.call("pipeline-log", method="GET", path=f"{run_id}/lint/1")
    assert log.status_code == 200, log.text
    lines = log.text.splitlines()
    assert lines[0].startswith("[faas-ci] outage-") and "lint attempt 1" in lines[0]
    assert [ln for ln in lines if ln.isdigit()] == [str(n) for n in range(1, 2001)]
    assert "lint-last-line" in lines
    print(f"{part} down {outage_s:.0f}s across lint's end: run {run_id} passed "
          f"{time.monotonic() - back_at:.1f}s after {part} came back "
          f"({time.monotonic() - began:.0f}s in all)")  # fmt: skip


def test_nats_down_150s_across_a_stage_end_the_passed_attempt_is_kept(own_stack, make_repo,
                                                                      outside):  # fmt: skip
    """NATS stopped 3 s before lint ends, for 150 s (past the store's own patience): lint is
    recorded passed (one attempt, not rerun, its commands run once), its log whole."""
    _outage_across_lint_end(own_stack, make_repo, outside, "nats", NATS_OUTAGE_S)


def test_s3_stopped_across_a_stage_end_the_passed_attempt_is_kept(own_stack, make_repo,
                                                                   outside):  # fmt: skip
    """S3 stopped 3 s before lint ends, started 20 s later: lint's log is uploaded once S3
    is back, the attempt recorded passed (one attempt), its log whole."""
    _outage_across_lint_end(own_stack, make_repo, outside, "s3", S3_OUTAGE_S)


def test_a_worker_killed_with_its_result_spooled_loses_nothing(own_stack, make_repo, outside):
    """S3 stopped across lint's end, lint's process killed (SIGKILL) while it holds the
    result: the function's next process stores the log and records lint passed, once."""
    _outage_across_lint_end(own_stack, make_repo, outside, "s3", 5, kill_worker=True)
