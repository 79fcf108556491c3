"""The example service's own pipeline delivers, end to end on the local stack: its Dockerfile
builds on the stack's offline base image, the image is pushed to the stack's registry and
named by digest, scanned, its integration tests run inside it, the digest is promoted to
staging in the stack's environment repository, and it is deployed as a function there."""

import subprocess

import yaml
from conftest import log_of, start_run, wait_for_run
from test_image_builds import manifest_digest
from test_pipeline_runs import faasci


def test_the_example_is_built_tested_promoted_and_deployed_by_digest(
    stack, gateway, sample_repo, engine_with_base, tmp_path
):
    """The recorded digest is the registry's for the commit's tag; integration ran in that
    image; staging's values name it in one new commit; the function runs it and answers."""
    run = wait_for_run(gateway, start_run(gateway, sample_repo), timeout=900)
    failed = [s["name"] for s in run["stages"] if s["status"] == "failed"]
    assert run["status"] == "passed", [log_of(gateway, run["id"], name) for name in failed]
    repository, _, digest = run["image"].partition("@")
    assert repository == f"{stack.registry}/sample-service"
    assert manifest_digest(stack.registry, repository, run["commit"]) == digest

    integration = log_of(gateway, run["id"], "integration")
    assert f"integration attempt 1 at {run['commit'][:12]} in {run['image']}" in integration
    assert " passed" in integration and "failed" not in integration
    attempts = {s["name"]: s["attempts"][-1] for s in run["stages"]}
    assert attempts["build"]["scan"]["passed"] is True and attempts["build"]["scan"]["sbom"]

    promotion = attempts["promote"]["promotion"]
    assert promotion["environment"] == "staging" and promotion["commit"]
    envs = tmp_path / "environments"
    subprocess.run(["git", "clone", "--quiet", stack.environments_repository, str(envs)],
                   check=True)  # fmt: skip
    head = subprocess.run(["git", "-C", str(envs), "log", "-1", "--format=%H%n%B"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert head.startswith(promotion["commit"]) and run["id"] in head
    values = yaml.safe_load((envs / "sample-service/staging/values.yaml").read_text())
    assert values["image"] == {"repository": repository, "digest": digest}

    deployment = attempts["deploy"]["deployment"]
    assert deployment["image"] == run["image"]
    shown = gateway.session.get(f"{gateway.url}/system/function/sample-service").json()
    assert shown["image"] == run["image"] and shown["availableReplicas"] >= 1
    health = gateway.call("sample-service", method="GET", path="health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "env": "production"}

    shown = faasci(stack, "show", run["id"]).stdout
    assert "promoted: staging (sample-service/staging/values.yaml in " in shown
    assert f"commit {promotion['commit'][:12]})" in shown
    assert "deployed: openfaas sample-service, healthy after " in shown


def test_a_feature_branch_is_tested_and_built_but_neither_promoted_nor_deployed(
    stack, gateway, sample_repo, engine_with_base
):
    """A ref no environment takes: the run passes, promote and deploy say why they did
    nothing, and the deployed function keeps the image it had."""
    subprocess.run(["git", "-C", str(sample_repo), "checkout", "--quiet", "-b", "feature"],
                   check=True)  # fmt: skip
    before = gateway.session.get(f"{gateway.url}/system/function/sample-service")
    run = wait_for_run(gateway, start_run(gateway, sample_repo), timeout=900)
    assert run["status"] == "passed" and run["ref"] == "feature" and run["image"]
    attempts = {s["name"]: s["attempts"][-1] for s in run["stages"]}
    assert attempts["promote"]["promotion"]["environment"] is None
    assert "matches no environment" in log_of(gateway, run["id"], "promote")
    assert attempts["deploy"]["deployment"] is None
    assert "promoted to no environment: nothing is rolled out" in log_of(
        gateway, run["id"], "deploy"
    )
    after = gateway.session.get(f"{gateway.url}/system/function/sample-service")
    assert after.status_code == before.status_code
    if before.status_code == 200:
        assert after.json()["image"] == before.json()["image"] != run["image"]
