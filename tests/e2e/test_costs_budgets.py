"""Cost attribution on the real stack: stage attempts record what their processes used,
`faasci costs` prices it by service, stage and environment, `faasci show --timeline` draws
the run, and a service's tiny monthly budget raises one 80% alert at the (fake) Slack."""

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import FAASCI, commit_all, git, start_run, wait_for_run

# 0.2 s of CPU time by the process's own clock (however busy the machine is).
BURN = ("python3 -c \"import time; t = time.process_time(); "
        "[0 for _ in iter(lambda: time.process_time() - t < 0.2, False)]\"")  # fmt: skip


def burning_repo(parent: Path, service: str) -> Path:
    """A committed repository of a service whose two stages each burn 0.2 s of CPU."""
    repo = parent / service
    repo.mkdir()
    stages = "".join(
        f"  {name}:\n    run:\n      - {json.dumps(BURN)}\n" for name in ("lint", "unit")
    )
    (repo / ".faasci.yml").write_text(f"service: {service}\nstages:\n{stages}")
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "burn")
    return repo


def faasci(*args: str) -> subprocess.CompletedProcess:
    """The `faasci` command against the test stack (its address in this process's env)."""
    env = {**os.environ, "COLUMNS": "120", "TERM": "dumb"}
    return subprocess.run([FAASCI, *args], env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture(scope="module")
def two_services(stack, gateway, tmp_path_factory):
    """One passed run each of two services whose stages burn CPU: {service: run record}."""
    done, parent = {}, tmp_path_factory.mktemp("costs")
    for service in (f"costs-a-{uuid.uuid4().hex[:6]}", f"costs-b-{uuid.uuid4().hex[:6]}"):
        repo = burning_repo(parent, service)
        run = wait_for_run(gateway, start_run(gateway, repo), timeout=180)
        assert run["status"] == "passed", run
        done[service] = run
    return done


def test_each_attempt_records_what_its_processes_used(two_services):
    """Every attempt's record holds its CPU seconds (the 0.2 s burned, at least), peak
    memory and wall time, and its environment tag."""
    for run in two_services.values():
        for stage in run["stages"]:
            used = stage["attempts"][0]["usage"]
            assert used["cpu_s"] >= 0.2, stage
            assert used["peak_rss_bytes"] > 2**20 and used["wall_s"] >= used["cpu_s"] * 0.5
            assert used["commands"] == 1 and used["environment"] == "none"


def test_faasci_costs_by_service_shows_both_with_cpu_seconds(two_services):
    """`faasci costs --by service`: both services, each with its CPU seconds and a cost."""
    done = faasci("costs", "--by", "service", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    lines = {line["key"]: line for line in found["lines"]}
    for service in two_services:
        assert lines[service]["attempts"] == 2
        assert lines[service]["cpu_s"] >= 0.4 and lines[service]["cost"] > 0
    assert found["rate_card"]["currency"] == "USD"
    table = faasci("costs", "--by", "service")
    assert table.returncode == 0, table.stderr
    for service in two_services:
        row = next(line for line in table.stdout.splitlines() if service in line)
        assert float(row.split()[row.split().index(service) + 2]) >= 0.4  # its CPU s


def test_costs_group_by_stage_and_environment_through_the_api(two_services, gateway):
    """GET /function/runs/costs?by=stage|environment groups the same attempts otherwise."""
    by_stage = gateway.call("runs", method="GET", path="costs", query={"by": "stage"}).json()
    stages = {line["key"]: line for line in by_stage["lines"]}
    assert stages["lint"]["attempts"] >= 2 and stages["unit"]["attempts"] >= 2
    by_env = gateway.call("runs", method="GET", path="costs",
                          query={"by": "environment", "since": "2026-01-01"}).json()  # fmt: skip
    assert "none" in {line["key"] for line in by_env["lines"]}
    assert by_env["total"]["attempts"] == by_stage["total"]["attempts"]


@pytest.mark.parametrize("query, field", [({"by": "repo"}, "by"), ({"since": "last week"}, "since"),
                                          ({"since": "2026-02-30"}, "since")])  # fmt: skip
def test_bad_costs_queries_are_400_naming_the_field(stack, gateway, query, field):
    """A grouping that is not one, or a `since` that is not a date, is a 400 naming it."""
    resp = gateway.call("runs", method="GET", path="costs", query=query)
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field


def test_costs_are_for_viewers_and_above(stack, token):
    """A viewer may read the costs; a token without a role may not."""
    import requests

    url = f"{stack.gateway_url}/function/runs/costs"
    viewer = requests.get(url, headers={"Authorization": f"Bearer {token('viewer')}"}, timeout=60)
    assert viewer.status_code == 200, viewer.text
    nobody = requests.get(url, headers={"Authorization": f"Bearer {token('none')}"}, timeout=60)
    assert nobody.status_code == 403


def test_show_timeline_draws_the_attempts_and_names_the_dominant_stage(two_services):
    """`faasci show <run> --timeline`: a bar per attempt (queued ░, running █) to scale, and
    the stage that dominated."""
    run_id = next(iter(two_services.values()))["id"]
    done = faasci("show", run_id, "--timeline")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    bars = [line for line in lines if line.startswith(("lint #1", "unit #1"))]
    assert len(bars) == 2 and all("█" in bar for bar in bars)
    assert any(line.startswith("dominated by ") for line in lines)


def budget_alerts(slack, service: str, header: str) -> list[dict]:
    return [m for m in slack.delivered
            if f'"{header}: {service}"' in json.dumps(m)]  # fmt: skip


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"still no {what}"
        time.sleep(0.3)
    return found


def test_a_tiny_budget_raises_one_80_percent_alert(stack, gateway, slack, client_settings,
                                                    tmp_path):  # fmt: skip
    """A budget the first run overspends: one 80% alert (and one 100%) at Slack, and the
    next run, spending more, raises neither again."""
    from nats.js.errors import KeyNotFoundError

    from faasci import costs, services

    service = f"budget-{uuid.uuid4().hex[:6]}"
    resp = gateway.call("runs", {"monthly_budget": 1e-9}, method="PUT", path=f"limits/{service}")
    assert resp.status_code == 200, resp.text
    repo = burning_repo(tmp_path, service)
    for _ in range(2):
        assert wait_for_run(gateway, start_run(gateway, repo), timeout=180)["status"] == "passed"
    # The month's spend counter has taken both runs' attempts: every alert is claimed by now.
    card, start = costs.rate_card(), costs.month_start()
    expected = costs.month_spend(service, start, card)

    async def counter():
        kv = await services.bus().bucket(costs.SPEND_BUCKET, ttl=costs.KEEP_S)
        try:
            entry = await kv.get(f"{service}.{costs.month_key(start)}")
        except KeyNotFoundError:
            return None
        return json.loads(entry.value)["spent"]

    def counted() -> bool:
        spent = services.bus().call(counter)
        return spent is not None and abs(spent - expected) < 1e-12

    wait_for(counted, "spend of both runs")
    wait_for(lambda: budget_alerts(slack, service, "Budget reached"), "100% alert")
    at_80 = wait_for(lambda: budget_alerts(slack, service, "Budget at 80%"), "80% alert")
    assert len(at_80) == 1
    assert len(budget_alerts(slack, service, "Budget reached")) == 1
    assert service in at_80[0]["text"] and "USD" in at_80[0]["text"]


def test_a_stage_in_a_container_is_accounted_from_its_cgroup(stack, gateway, tmp_path,
                                                             engine_with_base):  # fmt: skip
    """`image:` commands run in containers: their CPU and peak memory come from the
    container's cgroup, read while it runs."""
    long_burn = BURN.replace("< 0.2", "< 1.0")
    repo = tmp_path / "boxed-costs"
    repo.mkdir()
    (repo / ".faasci.yml").write_text(
        f"service: boxed-costs\nstages:\n  unit:\n    image: {json.dumps(engine_with_base)}\n"
        f"    run:\n      - {json.dumps(long_burn)}\n"
    )
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "burn in a container")
    run = wait_for_run(gateway, start_run(gateway, repo), timeout=300)
    assert run["status"] == "passed", run
    used = run["stages"][0]["attempts"][0]["usage"]
    assert used["commands"] == 1 and used["cpu_s"] >= 0.5  # 1 s burned, read every 0.2 s
    assert used["peak_rss_bytes"] > 2**20 and used["wall_s"] >= 1.0
