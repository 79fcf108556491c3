"""Concurrency caps with burst on the real local stack: a service's limits set through the
runs function (and `faasci limits`), five runs of it started at once, and how many of its
stage attempts overlapped computed from the run records' started_at and finished_at."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from conftest import FAASCI, ROOT, start_run, wait_for_run

from faasci.invoke import Gateway

RUNS = 5
CLAIM_SLACK = timedelta(seconds=0.5)  # a slot is taken a moment before the attempt's claim


def sleeping_service(make_repo, seconds: int) -> tuple[str, Path]:
    """A service of a fresh name whose one stage sleeps `seconds`: (its name, its repo)."""
    name = f"capped-{uuid.uuid4().hex[:8]}"
    spec = f"service: {name}\nstages:\n  unit:\n    run: ['sleep {seconds}']\n    retries: 0\n"
    return name, make_repo({".faasci.yml": spec}, name=name)


def set_limits(gateway, service: str, **values) -> dict:
    resp = gateway.call("runs", values, path=f"limits/{service}", method="PUT")
    assert resp.status_code == 200, resp.text
    return resp.json()


def run_at_once(stack, token, repo: Path) -> list[dict]:
    """RUNS runs of `repo` started at the same time (a client each); their final records."""

    def one(_) -> dict:
        client = Gateway(stack.gateway_url, timeout=120, token=lambda: token("runner"))
        return wait_for_run(client, start_run(client, repo), timeout=180)

    with ThreadPoolExecutor(RUNS) as pool:
        return list(pool.map(one, range(RUNS)))


def attempts(records: list[dict]) -> list[dict]:
    found = [a for r in records for s in r["stages"] for a in s["attempts"]]
    for a in found:
        for name in ("queued_at", "started_at", "finished_at"):
            a[name] = datetime.fromisoformat(a[name].replace("Z", "+00:00"))
    return sorted(found, key=lambda a: a["started_at"])


def overlap_at(moment: datetime, found: list[dict]) -> int:
    """How many attempts were running at `moment` (started, not yet finished)."""
    return sum(1 for a in found if a["started_at"] <= moment < a["finished_at"])


def test_limits_are_read_by_viewers_set_by_admins_and_bad_ones_name_their_field(
    gateway, token, stack
):
    """GET shows the defaults to a viewer; a runner may not PUT; a bad body is a 400 naming
    the field; a PUT keeps what it does not name, shows in `faasci limits`, and is audited."""
    service = f"limits-{uuid.uuid4().hex[:8]}"
    viewer = Gateway(stack.gateway_url, timeout=60, token=lambda: token("viewer"))
    shown = viewer.call("runs", method="GET", path=f"limits/{service}")
    assert shown.status_code == 200, shown.text
    assert {k: shown.json()[k] for k in ("concurrency", "burst", "burst_window_s")} == {
        "concurrency": 10, "burst": 25, "burst_window_s": 60,
    }  # fmt: skip
    assert shown.json()["overrides"] == {} and shown.json()["usage"]["running"] == 0
    runner = Gateway(stack.gateway_url, timeout=60, token=lambda: token("runner"))
    refused = runner.call("runs", {"concurrency": 1}, path=f"limits/{service}", method="PUT")
    assert refused.status_code == 403
    for body, field in (({"concurrency": "two"}, "concurrency"), ({"burst": 0}, "burst"),
                        ({"workers": 3}, "workers"), ({"concurrency": 5, "burst": 3}, "burst"),
                        ({"monthly_budget": -1}, "monthly_budget")):  # fmt: skip
        bad = gateway.call("runs", body, path=f"limits/{service}", method="PUT")
        assert bad.status_code == 400 and bad.json()["field"] == field, (body, bad.text)
    bad_name = gateway.call("runs", {"burst": 3}, path="limits/-nope", method="PUT")
    assert bad_name.status_code == 400 and bad_name.json()["field"] == "service"
    set_limits(gateway, service, concurrency=3, monthly_budget=40)
    both = set_limits(gateway, service, burst=6)
    assert (both["concurrency"], both["burst"], both["monthly_budget"]) == (3, 6, 40)
    assert both["overrides"] == {"concurrency": 3, "burst": 6, "monthly_budget": 40}
    env = {**os.environ, **stack.env()}
    cli = subprocess.run([FAASCI, "limits", service, "--burst-window", "5", "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["burst_window_s"] == 5
    shown = subprocess.run([FAASCI, "limits", service], capture_output=True, text=True,
                           env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "concurrency     3\n" in shown.stdout and "burst window    5 s\n" in shown.stdout
    audit = gateway.call("runs", method="GET", path="audit", query={"since": "1h"}).json()
    mine = [e for e in audit["entries"]
            if e["action"] == "limits.set" and e["detail"].get("service") == service]  # fmt: skip
    assert [e["detail"].get("burst") for e in mine] == [None, 6, None]


def test_a_cap_of_two_runs_two_stages_at_once_and_the_rest_wait_queued(
    gateway, token, stack, make_repo
):
    """Cap 2, five runs at once: never more than 2 attempts overlap, all 5 pass, and those
    that waited were queued (their queue wait covers the wait for a slot)."""
    service, repo = sleeping_service(make_repo, 3)
    set_limits(gateway, service, concurrency=2, burst=2)
    records = run_at_once(stack, token, repo)
    assert [r["status"] for r in records] == ["passed"] * RUNS, [r["id"] for r in records]
    found = attempts(records)
    assert len(found) == RUNS
    assert max(overlap_at(a["started_at"], found) for a in found) == 2
    first_end = min(a["finished_at"] for a in found)
    waited = [a for a in found if a["started_at"] >= first_end]
    assert len(waited) >= RUNS - 2
    for a in waited:  # owed before any slot came free, claimed only once it held one
        assert a["queued_at"] < first_end <= a["started_at"]
    usage = gateway.call("runs", method="GET", path=f"limits/{service}").json()["usage"]
    assert (usage["running"], usage["waiting"], usage["limit"]) == (0, 0, 2)


def test_a_burst_of_three_lets_a_third_start_during_its_window_only(
    gateway, token, stack, make_repo
):
    """Cap 2, burst 3 for 3 s, five runs of 5 s at once: 3 overlap, a third attempt starts
    only inside the burst's window, and every attempt starting after it starts beside at
    most one other (the next burst waits out a cool-down as long as the window); all 5
    pass."""
    service, repo = sleeping_service(make_repo, 5)
    set_limits(gateway, service, concurrency=2, burst=3, burst_window_s=3)
    records = run_at_once(stack, token, repo)
    assert [r["status"] for r in records] == ["passed"] * RUNS, [r["id"] for r in records]
    found = attempts(records)
    usage = gateway.call("runs", method="GET", path=f"limits/{service}").json()["usage"]
    burst_from = datetime.fromisoformat(usage["burst_from"])
    burst_until = datetime.fromisoformat(usage["burst_until"])
    assert burst_until - burst_from == timedelta(seconds=3)
    at_start = [(a["started_at"], overlap_at(a["started_at"], found)) for a in found]
    assert max(n for _, n in at_start) == 3
    for started, n in at_start:
        if n == 3:
            assert burst_from <= started <= burst_until + CLAIM_SLACK, (at_start, usage)
    after = [n for started, n in at_start if started > burst_until + CLAIM_SLACK]
    assert after and max(after) <= 2, (at_start, usage)
