"""Downstream pipelines on the real local stack: a library's release (its promote stage
passing, or a push bumping its version) runs the integration stage of each service that
depends on it, against that version; `faasci graph` shows the edge."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from conftest import FAASCI, commit_all, git, log_of, start_run, wait_for_run


def library(make_repo, service: str, package: str, version: str, name: str | None = None):
    """A library repository: its pyproject names the package and version; cheap stages."""
    return make_repo({
        "pyproject.toml": f'[project]\nname = "{package}"\nversion = "{version}"\n',
        ".faasci.yml": f"service: {service}\nstages:\n  unit: {{run: ['true']}}\n"
                       "  promote: {run: ['echo released']}\n",
    }, name=name)  # fmt: skip


def dependent(make_repo, service: str, depends_on: str):
    """A service that depends on the library; its integration stage prints what it ran
    against (nothing, in a run of its own)."""
    return make_repo({
        ".faasci.yml": f"service: {service}\ndepends_on: [{depends_on}]\nstages:\n"
                       "  unit: {run: ['true']}\n"
                       "  integration:\n"
                       "    run: ['echo \"against=${FAASCI_UPSTREAM:-nothing}\"']\n",
    })  # fmt: skip


def bump(repo: Path, package: str, version: str) -> str:
    (repo / "pyproject.toml").write_text(f'[project]\nname = "{package}"\nversion = "{version}"\n')
    return commit_all(repo, f"release {version}")


def upstream_runs(gateway, service: str, count: int, timeout: float = 90) -> list[dict]:
    """The service's runs started by an upstream, once there are `count` of them, finished."""
    deadline = time.monotonic() + timeout
    while True:
        listed = gateway.call("runs", method="GET", query={"service": service}).json()["runs"]
        found = [r for r in listed if r["trigger"].startswith("upstream:")]
        if len(found) >= count:
            return [wait_for_run(gateway, r["id"]) for r in found]
        assert time.monotonic() < deadline, f"{service}: {len(found)} upstream runs, not {count}"
        time.sleep(0.5)


def faasci(*args: str) -> str:
    done = subprocess.run([FAASCI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_released_library_runs_its_dependents_integration(gateway, make_repo):
    """The library's run passing promote starts the dependent's integration-only run with
    FAASCI_UPSTREAM=lib@version, recorded in the audit trail; the same version again starts
    none; `faasci graph` prints the edge both ways."""
    tag = uuid.uuid4().hex[:6]
    lib_name, svc_name = f"dlib-{tag}", f"dsvc-{tag}"
    svc = dependent(make_repo, svc_name, lib_name)
    lib = library(make_repo, lib_name, lib_name, "0.1.0")
    assert wait_for_run(gateway, start_run(gateway, svc))["status"] == "passed"  # catalogued

    bump(lib, lib_name, "0.2.0")
    released = wait_for_run(gateway, start_run(gateway, lib))
    assert released["status"] == "passed"
    [run] = upstream_runs(gateway, svc_name, 1)
    assert run["status"] == "passed" and run["trigger"] == f"upstream:{lib_name}"
    assert [s["name"] for s in run["stages"]] == ["integration"]
    assert f"against={lib_name}@0.2.0" in log_of(gateway, run["id"], "integration")
    trail = json.loads(faasci("audit", "--json", "--run", run["id"]))
    assert [(e["action"], e["detail"]["trigger"], e["detail"]["only"]) for e in trail] == [
        ("run.start", f"upstream:{lib_name}", "integration")
    ]

    again = wait_for_run(gateway, start_run(gateway, lib))  # the same version: no second run
    assert again["status"] == "passed"
    time.sleep(2)
    assert len(upstream_runs(gateway, svc_name, 1)) == 1

    graph = json.loads(faasci("graph", "--json"))["services"]
    assert graph[svc_name]["depends_on"] == [lib_name]
    assert graph[lib_name]["dependents"] == [svc_name] and graph[lib_name]["version"] == "0.2.0"
    text = faasci("graph")
    assert f"{lib_name} 0.2.0\n  <- {svc_name}" in text and f"{svc_name}\n  -> {lib_name}" in text


def test_a_pushed_version_bump_runs_dependents(gateway, make_repo, webhook):
    """A push that bumps the library's version in pyproject.toml starts the dependent's
    integration run against the new version at once (named by package); the pushed run's
    own release of that version starts no second one."""
    tag = uuid.uuid4().hex[:6]
    lib_name, package, svc_name = f"plib-{tag}", f"plib_pkg_{tag}", f"psvc-{tag}"
    # The test stack takes pushes of tmp repositories named cache-* (WEBHOOK_REPOS).
    lib = library(make_repo, lib_name, package, "1.0.0", name=f"cache-downstream-{tag}")

    def push(head: str) -> dict:
        body = {"ref": "refs/heads/main", "before": "0" * 39 + "1", "after": head,
                "repository": {"clone_url": f"file://{lib}"},
                "sender": {"login": "octocat"}}  # fmt: skip
        answer = webhook(body)
        assert answer.status_code == 202, answer.text
        return wait_for_run(gateway, answer.json()["run_id"])

    assert push(git(lib, "rev-parse", "HEAD"))["status"] == "passed"  # 1.0.0 catalogued
    svc = dependent(make_repo, svc_name, package.replace("_", "-"))  # PEP 503: one name
    assert wait_for_run(gateway, start_run(gateway, svc))["status"] == "passed"

    assert push(bump(lib, package, "1.1.0"))["status"] == "passed"
    [run] = upstream_runs(gateway, svc_name, 1)
    assert run["status"] == "passed" and run["trigger"] == f"upstream:{package}"
    assert f"against={package}@1.1.0" in log_of(gateway, run["id"], "integration")
    time.sleep(2)
    assert len(upstream_runs(gateway, svc_name, 1)) == 1
