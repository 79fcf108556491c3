"""Whole runs on the real local stack: six stages chained through async invocations."""

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import FAASCI, ROOT, SAMPLE, commit_all, git, wait_for_run


def faasci(stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.env()}
    return subprocess.run([FAASCI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def fail_fast(service: Path) -> None:
    """Narrow the sample's unit stage to fail at its first red test (by default a failing
    test is retried three times, with the back-off)."""
    spec = service / ".faasci.yml"
    unit = '    run: ["python -m pytest -q tests/unit"]\n'
    assert unit in spec.read_text()
    spec.write_text(spec.read_text().replace(unit, unit + "    retry_on: [timeout, infra]\n"))


def test_sample_service_passes_all_six_stages(stack, sample_repo):
    """`faasci run --json` on the sample service ends passed with six timed stages."""
    done = faasci(stack, "run", str(sample_repo), "--json")
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "passed"
    assert [s["name"] for s in run["stages"]] == [
        "lint", "unit", "build", "integration", "promote", "deploy",
    ]  # fmt: skip
    for stage in run["stages"]:
        assert stage["status"] == "passed"
        (attempt,) = stage["attempts"]
        assert attempt["exit_code"] == 0
        assert attempt["started_at"].endswith("Z") and attempt["finished_at"].endswith("Z")
        assert attempt["duration_s"] > 0
        link = attempt["log"].partition("?sig=")[0]  # signed: it opens without a token
        assert link.endswith(f"/function/pipeline-log/{run['id']}/{stage['name']}/1")
    assert (
        run["commit"]
        == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=sample_repo, text=True).strip()
    )
    assert run["snapshot"] is False and run["ref"] == "main"


def test_failing_unit_tests_stop_the_run_at_unit(stack, sample_repo):
    """A failing unit test fails the run at unit (at once with `retry_on: [timeout, infra]`);
    its output is in `faasci logs`."""
    fail_fast(sample_repo)
    test = sample_repo / "tests" / "unit" / "test_broken.py"
    test.write_text("def test_inventory_is_broken():\n    assert 1 + 1 == 3, 'arithmetic'\n")
    commit_all(sample_repo, "break a test")
    done = faasci(stack, "run", str(sample_repo), "--json")
    assert done.returncode == 1
    run = json.loads(done.stdout)
    assert run["status"] == "failed"
    statuses = {s["name"]: s["status"] for s in run["stages"]}
    assert statuses == {
        "lint": "passed",
        "unit": "failed",
        "build": "skipped",
        "integration": "skipped",
        "promote": "skipped",
        "deploy": "skipped",
    }
    unit = run["stages"][1]
    assert len(unit["attempts"]) == 1  # not retried: the pipeline narrowed retry_on
    assert unit["attempts"][0]["exit_code"] == 1
    assert all(not s["attempts"] for s in run["stages"][2:])
    logs = faasci(stack, "logs", run["id"], "unit")
    assert logs.returncode == 0
    assert "test_inventory_is_broken" in logs.stdout and "arithmetic" in logs.stdout


def test_folder_in_a_repository_with_changes_runs_a_snapshot(stack, tmp_path):
    """A service folder inside a bigger repository, with uncommitted work, runs as a snapshot."""
    outer = tmp_path / "monorepo"
    service = outer / "services" / "inventory"
    shutil.copytree(SAMPLE, service, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
    fail_fast(service)
    git(outer, "init", "--quiet", "--initial-branch=trunk")
    head = commit_all(outer, "monorepo")
    status_before = git(outer, "status", "--porcelain")
    # Uncommitted, untracked work the run must see: a test that fails on purpose.
    (service / "tests" / "unit" / "test_uncommitted.py").write_text(
        "def test_sees_uncommitted_work():\n    assert False, 'uncommitted work seen'\n"
    )
    done = faasci(stack, "run", str(service), "--json")
    assert done.returncode == 1, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "failed" and run["stages"][1]["status"] == "failed"
    assert run["snapshot"] is True and run["commit"] != head
    assert run["path"] == "services/inventory" and run["ref"] == "trunk"
    assert "uncommitted work seen" in faasci(stack, "logs", run["id"], "unit").stdout
    assert git(outer, "rev-parse", "HEAD") == head  # the user's repository is untouched
    assert git(outer, "status", "--porcelain") != status_before  # the work is still uncommitted


def test_runs_and_show_list_the_history(stack, gateway, sample_repo):
    """The runs function lists runs newest first and shows one by id."""
    run = gateway.call("runs", {"repo": str(sample_repo)}).json()
    final = wait_for_run(gateway, run["id"])
    listed = gateway.call("runs", method="GET", query={"limit": 5}).json()["runs"]
    assert listed[0]["id"] == run["id"] and listed[0]["status"] == final["status"]
    shown = faasci(stack, "show", run["id"], "--json")
    assert json.loads(shown.stdout)["id"] == run["id"]
