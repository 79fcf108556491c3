"""Registry retention on the real registry: images whose config says they were created in
1970 (built with Podman's `--timestamp`, pushed to the stack's Distribution registry); the
one an environment repository names stays, the other is deleted through the registry's
API and its blobs are collected; a dry run deletes nothing."""

from __future__ import annotations

import uuid

import requests
from conftest import new_env_repo, wait_for_run

from faasci.local.engine import Engine

MANIFESTS = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])  # fmt: skip
OLD = "86400"  # 1970-01-02: far past any retention period, honestly in the image's config


def push_image(engine: Engine, ctx, ref: str, timestamp: str | None) -> None:
    """Build a one-file image FROM scratch (its content unique to `ref`) and push it."""
    ctx.mkdir(parents=True)
    (ctx / "id.txt").write_text(f"{ref} {uuid.uuid4()}\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY id.txt /id.txt\n")
    stamp = ["--timestamp", timestamp] if timestamp else []
    for args in (["build", *stamp, "-t", ref, str(ctx)], ["push", ref]):
        done = engine.podman(*args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr


def manifest(registry: str, name: str, reference: str) -> requests.Response:
    return requests.get(f"http://{registry}/v2/{name}/manifests/{reference}",
                        headers={"Accept": MANIFESTS}, timeout=10)  # fmt: skip


def test_retention_deletes_the_old_unreferenced_tag_and_keeps_the_referenced(
    stack, gateway, token, make_repo, tmp_path, git_daemon
):
    """Two 1970 tags, one named in an environment repository a run's promote stage names:
    the other one's manifest answers 404 and its layer is collected; the referenced one
    and a young one are still served; a dry run first deletes nothing; a viewer may not."""
    registry, tag = stack.registry, uuid.uuid4().hex[:8]
    engine = Engine.for_stack(stack)
    engine.start()
    names = {k: f"retention-{tag}/{k}" for k in ("gone", "referenced", "young")}
    for key, name in names.items():
        push_image(engine, tmp_path / key, f"{registry}/{name}:v1", None if key == "young" else OLD)
    found = {k: manifest(registry, n, "v1") for k, n in names.items()}
    digests = {k: r.headers["Docker-Content-Digest"] for k, r in found.items()}
    gone_layer = found["gone"].json()["layers"][0]["digest"]
    kept_layer = found["referenced"].json()["layers"][0]["digest"]
    blob = f"http://{registry}/v2/{names['gone']}/blobs/{gone_layer}"
    assert requests.head(blob, timeout=10).status_code == 200

    # The environment repository (served by git daemon: a promote stage names remote ones
    # only), named by a run's promote stage (the run fails before it).
    envs = new_env_repo(git_daemon, f"retention-{tag}.git", {
        "staging/values.yaml": f"image:\n  repository: {registry}/{names['referenced']}\n"
                               f"  digest: {digests['referenced']}\n"}).url  # fmt: skip
    service = make_repo(
        {
            ".faasci.yml": f"""\
service: retention-{tag}
stages:
  unit: {{run: ["false"], retries: 0}}
  promote:
    gitops:
      repository: {envs}
      environments: {{staging: {{refs: [main], file: staging/values.yaml}}}}
"""
        }
    )
    started = gateway.call("runs", {"repo": str(service)})
    assert started.status_code == 201, started.text
    assert wait_for_run(gateway, started.json()["id"])["status"] == "failed"

    viewer = requests.post(f"{stack.gateway_url}/function/registry-retention", timeout=60,
                           headers={"Authorization": f"Bearer {token('viewer')}"})  # fmt: skip
    assert viewer.status_code == 403 and viewer.json()["field"] == "role"

    dry = gateway.call("registry-retention", query={"dry_run": "1"}, timeout=600)
    assert dry.status_code == 200, dry.text
    planned = [d["ref"] for d in dry.json()["deleted"]]
    assert f"{names['gone']}@{digests['gone']}" in planned
    assert manifest(registry, names["gone"], "v1").status_code == 200  # nothing deleted

    done = gateway.call("registry-retention", timeout=600)
    assert done.status_code == 200, done.text
    answer = done.json()
    assert f"{names['gone']}@{digests['gone']}" in [d["ref"] for d in answer["deleted"]]
    why = {k["digest"]: k["why"] for k in answer["kept"]}
    assert why[digests["referenced"]] == "referenced by an environment repository"
    assert why[digests["young"]].startswith("younger than 30 days")
    assert answer["gc"] == "collected" and answer["freed_bytes"] > 0

    assert manifest(registry, names["gone"], "v1").status_code == 404
    assert manifest(registry, names["gone"], digests["gone"]).status_code == 404
    assert requests.head(blob, timeout=10).status_code == 404  # the blob was collected
    assert manifest(registry, names["referenced"], "v1").status_code == 200
    kept_blob = f"http://{registry}/v2/{names['referenced']}/blobs/{kept_layer}"
    assert requests.head(kept_blob, timeout=10).status_code == 200
    assert manifest(registry, names["young"], "v1").status_code == 200
