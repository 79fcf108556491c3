"""Headers a client chooses change nothing internal: a forged X-Call-Id equal to a hand-off
to come does not drop that hand-off, and X-Callback-Url goes only where it is allowed (a
callback to the stack's own /function/unit carries no credentials and starts nothing)."""

import json
import time

import requests
from conftest import wait_for_run


def run_ids(gateway) -> set[str]:
    return {
        r["id"] for r in gateway.call("runs", method="GET", query={"limit": 500}).json()["runs"]
    }


def test_callback_urls_outside_the_allow_list_get_400(gateway):
    before = run_ids(gateway)
    for url in ("http://127.0.0.1:9/elsewhere", "http://169.254.169.254/latest/meta-data/",
                f"{gateway.url}/async-function/unit", f"{gateway.url}/system/functions",
                f"{gateway.url}/function/../system/functions"):  # fmt: skip
        resp = gateway.session.post(f"{gateway.url}/async-function/runs", data=b"{}",
                                    headers={"X-Callback-Url": url})  # fmt: skip
        assert resp.status_code == 400, (url, resp.text)
        assert resp.json()["field"] == "X-Callback-Url" and "not allowed" in resp.json()["error"]
    assert run_ids(gateway) == before


def test_a_forged_call_id_does_not_drop_the_real_hand_off(gateway, make_repo, outside,
                                                         callback_receiver):  # fmt: skip
    """While lint runs, the hand-off to unit (`<run>.unit.1`, body {"run_id", "attempt": 1})
    is sent by a client first, with and without a token: both are answered (409: not
    queued yet; 401), and the real hand-off still runs unit once; the run passes."""
    url, received = callback_receiver
    started, marks = outside / "started", outside / "marks"
    repo = make_repo({".faasci.yml": f"""\
service: forged
stages:
  lint:
    run: ["touch {started}; sleep 4"]
  unit:
    run: ["echo unit >> {marks}"]
"""})  # fmt: skip
    run_id = gateway.call("runs", {"repo": str(repo)}).json()["id"]
    deadline = time.monotonic() + 60
    while not started.exists():
        assert time.monotonic() < deadline, "lint did not start"
        time.sleep(0.1)
    body = json.dumps({"run_id": run_id, "attempt": 1}).encode()  # what stage.dispatch sends
    headers = {"X-Call-Id": f"{run_id}.unit.1", "X-Callback-Url": url,
               "Content-Type": "application/json"}  # fmt: skip
    with_token = gateway.session.post(f"{gateway.url}/async-function/unit", data=body,
                                      headers=headers)  # fmt: skip
    without = requests.post(f"{gateway.url}/async-function/unit", data=body, headers=headers,
                            timeout=30)  # fmt: skip
    assert with_token.status_code == without.status_code == 202
    statuses = sorted(int(received.get(timeout=60)[0]["X-Function-Status"]) for _ in range(2))
    assert statuses == [401, 409]

    run = wait_for_run(gateway, run_id)
    assert run["status"] == "passed"
    assert [s["status"] for s in run["stages"]] == ["passed", "passed"]
    assert marks.read_text().splitlines() == ["unit"]


def test_a_callback_to_the_stacks_own_function_starts_nothing(gateway, make_repo):
    """runs' answer (a run record: "repo" and all) POSTed to /function/unit by the
    gateway, as X-Callback-Url asks: allowed by the default list, but the callback carries
    no credentials, so unit starts no run of its own."""
    repo = make_repo({".faasci.yml": 'service: callback\nstages:\n  unit:\n    run: ["true"]\n'})
    before = run_ids(gateway)
    resp = gateway.session.post(f"{gateway.url}/async-function/runs",
                                data=json.dumps({"repo": str(repo)}).encode(),
                                headers={"X-Callback-Url": f"{gateway.url}/function/unit",
                                         "Content-Type": "application/json"})  # fmt: skip
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 60
    while not (run_ids(gateway) - before):
        assert time.monotonic() < deadline, "the async call to runs started no run"
        time.sleep(0.3)
    (started,) = run_ids(gateway) - before
    assert wait_for_run(gateway, started)["status"] == "passed"
    time.sleep(5)  # the callback reached unit long since: it started nothing
    assert run_ids(gateway) - before == {started}
