"""Runs that survive: retries with back-off, a killed function process, a restarted NATS
server, cancelling, and many runs at once, on the real local stack."""

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import psutil
import pytest
import requests
from conftest import FAASCI, wait_for_run

from faasci.local import processes, services


def pipeline_repo(make_repo, stages: str):
    return make_repo({".faasci.yml": f"service: resilience\nstages:\n{stages}"})


def start(gateway, repo) -> str:
    resp = gateway.call("runs", {"repo": str(repo)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def function_pid(gateway, name: str) -> int:
    listed = gateway.session.get(f"{gateway.url}/system/functions").json()
    return next(f["pid"] for f in listed if f["name"] == name)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_flaky_stage_passes_on_its_third_attempt(gateway, make_repo, outside):
    """Failing twice then passing (retry_on exit) ends passed with three attempts recorded."""
    count = outside / "count"
    repo = pipeline_repo(make_repo, f"""\
  unit:
    run: ["n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; \
echo attempt $n; test $n -ge 3"]
    retries: 3
    retry_on: [exit]
    backoff: {{initial_s: 0.5, factor: 2, max_s: 2}}
""")  # fmt: skip
    run = wait_for_run(gateway, start(gateway, repo))
    assert run["status"] == "passed"
    attempts = run["stages"][0]["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "failed", "passed"]
    assert [a["exit_code"] for a in attempts] == [1, 1, 0]
    assert len({a["log"] for a in attempts}) == 3 and all(a["duration_s"] for a in attempts)
    # each retry waited its back-off (0.5 s then 1 s, less up to half for jitter)
    gaps = [
        _seconds_between(attempts[i]["finished_at"], attempts[i + 1]["started_at"])
        for i in range(2)
    ]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5
    log = gateway.call("pipeline-log", method="GET", path=f"{run['id']}/unit/2").text
    assert "attempt 2" in log
    assert run["alert"] is None


def _seconds_between(a: str, b: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_killed_function_process_does_not_lose_the_run(gateway, make_repo, outside):
    """SIGKILL of the function running a stage: the run still passes and the stage's
    commands ran to completion exactly once."""
    starts, marker = outside / "starts", outside / "marker"
    repo = pipeline_repo(make_repo, f"""\
  unit:
    run: ["echo start >> {starts}; sleep 4; echo done >> {marker}"]
    backoff: {{initial_s: 0.5}}
  build:
    run: ["true"]
""")  # fmt: skip
    run_id = start(gateway, repo)
    wait_for(starts.exists, 60, "the unit stage to start")
    os.kill(function_pid(gateway, "unit"), signal.SIGKILL)
    run = wait_for_run(gateway, run_id, timeout=180)
    assert run["status"] == "passed"
    assert marker.read_text().splitlines() == ["done"]  # completed exactly once
    assert len(starts.read_text().splitlines()) == 2  # the killed attempt, then the retry
    unit = run["stages"][0]
    assert [a["status"] for a in unit["attempts"]] == ["failed", "passed"]
    assert "worker lost" in unit["attempts"][0]["error"]
    assert unit["attempts"][0]["reason"] == "infra"


def test_nats_restart_loses_and_duplicates_no_run(stack, gateway, make_repo, outside):
    """NATS killed and restarted while 20 runs are in flight: all 20 pass, each stage once."""
    markers = outside / "markers"
    repo = pipeline_repo(make_repo, f"""\
  lint:
    run: ["sleep 1; echo $FAASCI_RUN_ID lint >> {markers}"]
  unit:
    run: ["sleep 1; echo $FAASCI_RUN_ID unit >> {markers}"]
""")  # fmt: skip
    run_ids = [start(gateway, repo) for _ in range(20)]
    wait_for(lambda: markers.exists(), 60, "the first stages to run")
    os.kill(processes.pid_of(stack.run, "nats"), signal.SIGKILL)
    time.sleep(2)
    services.start_nats(stack, {**os.environ, **stack.env()})
    finals = [wait_for_run(gateway, run_id, timeout=300) for run_id in run_ids]
    assert [r["status"] for r in finals] == ["passed"] * 20
    retried = [(r["id"], s["name"], [a["error"] for a in s["attempts"]])
               for r in finals for s in r["stages"] if len(s["attempts"]) != 1]  # fmt: skip
    assert retried == []
    executed = Counter(markers.read_text().splitlines())
    assert set(executed.values()) == {1}
    assert len(executed) == 40


def test_cancel_stops_the_run_and_kills_its_processes(stack, gateway, make_repo, outside):
    """A cancelled run ends cancelled within seconds; its stage's child processes are gone."""
    started = outside / "started"
    repo = pipeline_repo(make_repo, f"""\
  lint:
    run: ["sleep 300.125 & sleep 300.25 & echo started >> {started}; wait"]
  unit:
    run: ["true"]
""")  # fmt: skip
    run_id = start(gateway, repo)
    wait_for(started.exists, 60, "the children")
    # Their pids inside the stage's pid namespace mean nothing here: found by argument.
    children = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "sleep"
                and (p.info["cmdline"] or [])[1:] in (["300.125"], ["300.25"])]  # fmt: skip
    assert len(children) == 2
    cancelled_at = time.monotonic()
    done = subprocess.run([FAASCI, "cancel", run_id], env={**os.environ, **stack.env()},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "cancelled" in done.stderr
    wait_for(lambda: not any(processes.alive(p.pid) for p in children), 10, "the children to die")
    run = wait_for_run(gateway, run_id)
    stopped_in = time.monotonic() - cancelled_at
    assert stopped_in < 10
    assert run["status"] == "cancelled"
    assert run["stages"][1]["status"] == "cancelled"  # queued: never starts

    def recorded() -> bool:  # the running stage: once its worker has stopped its commands
        lint = gateway.call("runs", method="GET", path=run_id).json()["stages"][0]
        return lint["status"] == "cancelled" and lint["attempts"][0]["status"] == "cancelled"

    wait_for(recorded, 15, "the running stage and its attempt to be recorded cancelled")
    again = gateway.call("runs", path=f"{run_id}/cancel")
    assert again.status_code == 409


@pytest.mark.parametrize("runs_at_once", [100])
def test_load_many_runs_at_once(gateway, make_repo, outside, capsys, runs_at_once):
    """100 runs of a short pipeline started at once all pass; no stage runs twice."""
    markers = outside / "markers"
    repo = pipeline_repo(make_repo, f"""\
  lint:
    run: ["echo $FAASCI_RUN_ID lint >> {markers}"]
  unit:
    run: ["echo $FAASCI_RUN_ID unit >> {markers}"]
""")  # fmt: skip
    began = time.monotonic()
    run_ids, lock = [], threading.Lock()

    def starter(n):
        for _ in range(n):
            run_id = start(gateway, repo)
            with lock:
                run_ids.append(run_id)

    threads = [threading.Thread(target=starter, args=(runs_at_once // 10,)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finals = [wait_for_run(gateway, run_id, timeout=600) for run_id in run_ids]
    wall = time.monotonic() - began
    assert [r["status"] for r in finals] == ["passed"] * runs_at_once
    executed = Counter(markers.read_text().splitlines())
    assert len(executed) == 2 * runs_at_once and set(executed.values()) == {1}
    with capsys.disabled():
        print(json.dumps({"load_runs": runs_at_once, "wall_s": round(wall, 1),
                          "runs_per_minute": round(runs_at_once / wall * 60, 1)}))  # fmt: skip


# The Slack alert of a failed run.


def alerts_for(slack, run_id: str) -> list[dict]:
    return [m for m in slack.delivered if run_id in json.dumps(m)]


def links_in(message: dict) -> list[str]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(v for k, v in node.items() if k == "url" and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(message)
    return found


def failing_repo(make_repo, retries: int = 0):
    return pipeline_repo(make_repo, f"""\
  unit:
    run: ["echo attempt $FAASCI_ATTEMPT; echo 'AssertionError: boom' >&2; exit 3"]
    retries: {retries}
    retry_on: [exit]
    backoff: {{initial_s: 0.2, max_s: 0.5}}
  build:
    run: ["true"]
""")  # fmt: skip


def wait_for_alert(gateway, run_id: str, status: str, timeout: float = 60) -> dict:
    def current():
        return gateway.call("runs", method="GET", path=run_id).json()["alert"]

    wait_for(lambda: (current() or {}).get("status") == status, timeout, f"alert {status}")
    return current()


def test_exhausted_retries_fail_the_run_with_exactly_one_alert(gateway, slack, make_repo):
    """Always failing: 1 + retries attempts, the run fails, one alert linking the last log."""
    run = wait_for_run(gateway, start(gateway, failing_repo(make_repo, retries=2)))
    assert run["status"] == "failed"
    attempts = run["stages"][0]["attempts"]
    assert [a["status"] for a in attempts] == ["failed"] * 3
    assert run["stages"][1]["status"] == "skipped"
    alert = wait_for_alert(gateway, run["id"], "sent")
    assert alert["tries"] == 1
    time.sleep(2)  # nothing else arrives later
    (message,) = alerts_for(slack, run["id"])
    text = json.dumps(message)
    for fact in ("resilience", "unit", run["commit"][:12], "AssertionError: boom"):
        assert fact in text
    last_log = [u for u in links_in(message) if "/function/pipeline-log/" in u]
    assert last_log == [attempts[-1]["log"]]
    log = requests.get(last_log[0], timeout=30)  # the signed link: no token needed
    assert log.status_code == 200 and "attempt 3" in log.text


def test_slack_429_then_500_then_200_delivers_once(gateway, slack, make_repo):
    """Slack rate-limiting, then failing, then accepting: exactly one message arrives."""
    from slack_fake import Reply

    before = len(slack.requests)
    slack.script(Reply(status=429, retry_after=1), Reply(status=500))
    run = wait_for_run(gateway, start(gateway, failing_repo(make_repo)))
    assert run["status"] == "failed"
    wait_for_alert(gateway, run["id"], "sent")
    time.sleep(2)
    assert len(alerts_for(slack, run["id"])) == 1
    statuses = [r.status for r in slack.requests[before:]]
    assert statuses[:3] == [429, 500, 200]


def test_an_alert_waits_while_slack_is_unreachable(gateway, slack, make_repo):
    """Slack down: the alert stays queued; once Slack is back it is delivered, once."""
    slack.go_down()
    try:
        run = wait_for_run(gateway, start(gateway, failing_repo(make_repo)))
        pending = wait_for_alert(gateway, run["id"], "pending")
        assert pending["tries"] >= 1 and pending["last_error"]
    finally:
        slack.come_back()
    wait_for_alert(gateway, run["id"], "sent", timeout=120)
    time.sleep(2)
    assert len(alerts_for(slack, run["id"])) == 1
