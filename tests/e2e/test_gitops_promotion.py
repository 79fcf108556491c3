"""GitOps promotion on the real local stack: a run builds and pushes its image (engine,
registry), then its promote stage writes that digest into an environment repository served
by the real git daemon. main goes to staging at once; the tag v1.2.0 goes to production only
after an admin approves the run over HTTP (a runner's approval is refused)."""

import os
import subprocess
import time

import pytest
import requests
from conftest import FAASCI, commit_all, git, log_of, new_env_repo, wait_for_run

SERVICE = "promoted-service"


@pytest.fixture(scope="module")
def envs(git_daemon):
    """The environment repository of this module's runs."""
    return new_env_repo(git_daemon, "e2e-envs.git")


@pytest.fixture(scope="module")
def service_repo(tmp_path_factory, envs, engine_with_base):
    """A service whose build pushes a small image and whose promote stage is GitOps alone;
    main is also tagged v1.2.0, and v1.2.1 is a commit beside it whose promote stage gives
    an approval 6 s (its default retries kept)."""
    repo = tmp_path_factory.mktemp("gitops") / SERVICE
    repo.mkdir()
    (repo / ".faasci.yml").write_text(f"""\
service: {SERVICE}
stages:
  build:
    docker: {{file: Dockerfile}}
    scan: false  # the Trivy gate has tests of its own (test_trivy_gate.py)
    retries: 0
  promote:
    gitops:
      repository: {envs.url}
      branch: main
      environments:
        staging: {{refs: [main], file: staging/values.yaml}}
        production: {{refs: ["refs/tags/v*"], file: production/kustomization.yaml,
                      approval: admin}}
    timeout: 300
    retries: 0
""")
    (repo / "Dockerfile").write_text(f"FROM {engine_with_base}\nCOPY app.txt /app/app.txt\n")
    (repo / "app.txt").write_text("promoted\n")
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "a promoted service")
    git(repo, "tag", "v1.2.0")
    git(repo, "checkout", "--quiet", "-b", "impatient")
    text = (repo / ".faasci.yml").read_text()
    (repo / ".faasci.yml").write_text(text.replace("    timeout: 300\n    retries: 0\n",
                                                   "    timeout: 6\n"))  # fmt: skip
    commit_all(repo, "approvals are awaited 6 s")
    git(repo, "tag", "v1.2.1")
    git(repo, "checkout", "--quiet", "main")
    return repo


@pytest.fixture(scope="module")
def main_run(stack, gateway, service_repo, envs):
    """The run of main (staging): its final record, and main's history before it."""
    before = git(envs.path, "rev-list", "main").split()
    resp = gateway.call("runs", {"repo": str(service_repo), "ref": "main"})
    assert resp.status_code == 201, resp.text
    return wait_for_run(gateway, resp.json()["id"], timeout=600), before


def why(gateway, run: dict) -> str:
    """The failed stages' errors and logs, for an assertion's message."""
    return "\n".join(f"{s['name']}: {s['attempts'][-1]['error']}\n"
                     f"{log_of(gateway, run['id'], s['name'], len(s['attempts']))}"
                     for s in run["stages"] if s["status"] == "failed")  # fmt: skip


def promote_attempt(run: dict) -> dict:
    stage = next(s for s in run["stages"] if s["name"] == "promote")
    return stage["attempts"][-1]


def approve(stack, run_id: str, bearer: str) -> requests.Response:
    return requests.post(f"{stack.gateway_url}/function/runs/{run_id}/approve",
                         headers={"Authorization": f"Bearer {bearer}"}, timeout=60)  # fmt: skip


def test_a_run_of_main_leaves_one_commit_holding_its_digest_in_staging(gateway, envs, main_run):
    """The run passes; the environment repository has exactly one new commit, by faas-ci,
    naming the run, service and commit, and staging/values.yaml holds the run's image."""
    run, before = main_run
    assert run["status"] == "passed", why(gateway, run)
    repository, _, digest = run["image"].partition("@")
    after = git(envs.path, "rev-list", "main").split()
    assert after[1:] == before
    promotion = promote_attempt(run)["promotion"]
    assert promotion == {"environment": "staging", "repository": envs.url,
                         "file": "staging/values.yaml", "image": run["image"],
                         "commit": after[0], "approved_by": None}  # fmt: skip
    values = git(envs.path, "show", "main:staging/values.yaml")
    assert f"repository: {repository}" in values and f"digest: {digest}" in values
    message = git(envs.path, "log", "-1", "--format=%an%n%B", "main")
    assert message.startswith(f"faas-ci\nPromote {SERVICE} to staging (run {run['id']}, "
                              f"commit {run['commit'][:12]})")  # fmt: skip
    assert f"Faasci-Commit: {run['commit']}" in message
    assert f"pushed {after[0][:12]}" in log_of(gateway, run["id"], "promote")


def test_a_tag_reaches_production_only_after_an_admins_approval(
    stack, gateway, token, service_repo, envs, main_run
):
    """A run of v1.2.0 waits at promote with production untouched; a runner's approval is
    403; an admin's is taken (and in the audit trail); then the run passes and production's
    kustomization holds the digest, the promotion recording who approved."""
    production = git(envs.path, "show", "main:production/kustomization.yaml")
    run = waiting_run(stack, gateway, service_repo, "v1.2.0")
    run_id = run["id"]
    assert run["approval"]["environment"] == "production" and run["approval"]["by"] is None
    time.sleep(3)  # it waits: nothing lands meanwhile
    assert gateway.call("runs", method="GET", path=run_id).json()["status"] == "running"
    assert git(envs.path, "show", "main:production/kustomization.yaml") == production

    refused = approve(stack, run_id, token("runner"))
    assert refused.status_code == 403, refused.text
    assert gateway.call("runs", method="GET", path=run_id).json()["approval"]["by"] is None
    shown = faasci(stack, token, "show", run_id).stdout
    assert (
        f"waiting for an admin's approval to promote to production: faasci approve {run_id}"
        in shown
    )

    approved = approve(stack, run_id, token("admin"))
    assert approved.status_code == 200, approved.text
    by = approved.json()["approval"]["by"]
    assert by.startswith("user:")

    run = wait_for_run(gateway, run_id, timeout=120)
    assert run["status"] == "passed", why(gateway, run)
    promotion = promote_attempt(run)["promotion"]
    assert promotion["environment"] == "production" and promotion["approved_by"] == by
    assert promotion["commit"] == git(envs.path, "rev-parse", "main")
    kustomization = git(envs.path, "show", "main:production/kustomization.yaml")
    repository, _, digest = run["image"].partition("@")
    assert f"newName: {repository}" in kustomization and f"digest: {digest}" in kustomization
    log = log_of(gateway, run_id, "promote")
    assert "production needs an admin's approval" in log and f"approved by {by}" in log
    entries = gateway.call("runs", method="GET", path="audit", query={"run": run_id}).json()
    approvals = [e for e in entries["entries"] if e["action"] == "run.approve"]
    assert [(e["actor"], e["detail"]) for e in approvals] == [(by, {"environment": "production"})]
    again = approve(stack, run_id, token("admin"))
    assert again.status_code == 409 and again.json()["field"] == "run_id"


def faasci(stack, token, *args: str) -> subprocess.CompletedProcess:
    """The `faasci` command against the test stack, with an admin's token."""
    env = {**os.environ, "OPENFAAS_URL": stack.gateway_url, "FAASCI_TOKEN": token("admin")}
    return subprocess.run([FAASCI, *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def waiting_run(stack, gateway, service_repo, ref: str) -> dict:
    """Start a run of `ref`; its record once its promote stage asks for an approval."""
    resp = gateway.call("runs", {"repo": str(service_repo), "ref": ref})
    assert resp.status_code == 201, resp.text
    deadline = time.monotonic() + 600
    while True:
        run = gateway.call("runs", method="GET", path=resp.json()["id"]).json()
        assert run["status"] not in ("passed", "failed", "cancelled"), run
        if run["approval"]:
            return run
        assert time.monotonic() < deadline, "the run never asked for an approval"
        time.sleep(0.5)


def test_a_run_nobody_approves_fails_as_approval_without_retry(
    stack, gateway, token, service_repo, envs, main_run
):
    """v1.2.1's promote stage waits 6 s for an approval that never comes: it fails as
    `approval`, once (not retried, though its retries are the default), production stays
    untouched, and `faasci approve` afterwards fails saying the run has finished."""
    production = git(envs.path, "show", "main:production/kustomization.yaml")
    run = waiting_run(stack, gateway, service_repo, "v1.2.1")
    run = wait_for_run(gateway, run["id"], timeout=120)
    stage = next(s for s in run["stages"] if s["name"] == "promote")
    assert run["status"] == "failed" and len(stage["attempts"]) == 1, run
    attempt = stage["attempts"][0]
    assert attempt["reason"] == "approval" and "no admin approved" in attempt["error"]
    assert attempt["promotion"] is None
    assert git(envs.path, "show", "main:production/kustomization.yaml") == production
    done = faasci(stack, token, "approve", run["id"])
    assert done.returncode != 0 and "already failed (HTTP 409)" in done.stderr, done.stderr


def test_a_run_waiting_for_an_approval_can_be_cancelled(stack, gateway, service_repo, envs,
                                                        main_run):  # fmt: skip
    """Cancelling a run whose promote stage waits ends the wait within seconds: the attempt
    and the run are cancelled, nothing is pushed."""
    before = git(envs.path, "rev-parse", "main")
    run = waiting_run(stack, gateway, service_repo, "v1.2.0")
    assert gateway.call("runs", path=f"{run['id']}/cancel").status_code == 200
    run = wait_for_run(gateway, run["id"], timeout=30)
    stage = next(s for s in run["stages"] if s["name"] == "promote")
    deadline = time.monotonic() + 30
    while stage["attempts"][-1]["status"] == "running":  # the worker records it shortly
        assert time.monotonic() < deadline, stage
        time.sleep(0.5)
        run = gateway.call("runs", method="GET", path=run["id"]).json()
        stage = next(s for s in run["stages"] if s["name"] == "promote")
    assert run["status"] == "cancelled" and stage["attempts"][-1]["status"] == "cancelled"
    assert git(envs.path, "rev-parse", "main") == before


def test_approving_a_run_that_waits_for_nothing_is_409_and_unknown_404(stack, token, main_run):
    """The run of main never asked for an approval (409); an unknown run is 404."""
    run, _ = main_run
    resp = approve(stack, run["id"], token("admin"))
    assert resp.status_code == 409 and "already passed" in resp.json()["error"]
    resp = approve(stack, "20200101-000000-abcdef", token("admin"))
    assert resp.status_code == 404, resp.text
