"""Retries by default, as the seed says: a failing test is retried (with the back-off) before
the one alert, with no setting in the pipeline file."""

import pytest
from conftest import wait_for_run

pytestmark = pytest.mark.timeout(300)


def test_a_stage_failing_twice_by_exit_code_then_passing_passes_with_no_setting(
    gateway, make_repo, outside
):
    """No retries/retry_on/backoff in .faasci.yml: exit 1, exit 1, then exit 0 ends `passed`
    with three attempts (each ran once, by the counter file), each attempt's log reachable."""
    count = outside / "count"
    repo = make_repo({".faasci.yml": f"""\
service: default-retries
stages:
  unit:
    run: ["n=$(cat {count} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {count}; \
echo attempt $n; test $n -ge 3"]
"""})  # fmt: skip
    started = gateway.call("runs", {"repo": str(repo)})
    assert started.status_code == 201, started.text
    # the default back-off: 5 s then 10 s, each shortened by up to half for jitter
    run = wait_for_run(gateway, started.json()["id"], timeout=180)
    assert run["status"] == "passed", run
    (unit,) = run["stages"]
    attempts = unit["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "failed", "passed"]
    assert [(a["exit_code"], a["reason"]) for a in attempts] == [(1, "exit"), (1, "exit"),
                                                                 (0, None)]  # fmt: skip
    assert count.read_text().strip() == "3"  # three real executions, no more
    assert len({a["log"] for a in attempts}) == 3
    for number in (1, 2, 3):
        log = gateway.call("pipeline-log", method="GET", path=f"{run['id']}/unit/{number}")
        assert log.status_code == 200 and f"attempt {number}" in log.text, log.text
