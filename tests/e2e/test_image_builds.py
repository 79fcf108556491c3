"""The build stage builds the service's image with the docker SDK on the real engine (Podman),
pushes it to the stack's real registry (Distribution), and the run names it by the pushed
digest from then on: a later stage runs in exactly that image."""

import requests
from conftest import log_of, start_run, wait_for_run

MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])  # fmt: skip


def manifest_digest(registry: str, repository: str, tag: str) -> str:
    """The registry's own digest of the manifest it holds for repository:tag."""
    name = repository.removeprefix(f"{registry}/")
    resp = requests.head(f"http://{registry}/v2/{name}/manifests/{tag}",
                         headers={"Accept": MANIFEST_TYPES}, timeout=10)  # fmt: skip
    assert resp.status_code == 200, resp.text
    return resp.headers["Docker-Content-Digest"]


def image_repo(make_repo, base: str, dockerfile_extra: str = "", service: str = "imaged"):
    return make_repo({
        ".faasci.yml": f"""\
service: {service}
stages:
  build:
    docker:
      file: deploy/Dockerfile
      args: {{VERSION: "1.2.3"}}
    retries: 0
  integration:
    image: built
    run: ["cat /app/version.txt", "echo image=$FAASCI_IMAGE"]
""",
        "deploy/Dockerfile": f"""\
FROM {base}
ARG VERSION
RUN mkdir -p /app && echo "built version $VERSION" > /app/version.txt
COPY app.py /app/
{dockerfile_extra}""",
        "app.py": "print('hello')\n",
    })  # fmt: skip


def test_the_build_stage_pushes_an_image_that_integration_runs_by_digest(
    stack, gateway, make_repo, engine_with_base
):
    """The recorded image is <registry>/<service>@<digest>, the digest the registry holds
    for the commit's tag; integration ran in that image (its file, FAASCI_IMAGE)."""
    repo = image_repo(make_repo, engine_with_base)
    run = wait_for_run(gateway, start_run(gateway, repo), timeout=600)
    build_log = log_of(gateway, run["id"], "build")
    assert run["status"] == "passed", build_log
    repository, _, digest = run["image"].partition("@")
    assert repository == f"{stack.registry}/imaged" and digest.startswith("sha256:")
    assert manifest_digest(stack.registry, repository, run["commit"]) == digest
    build = run["stages"][0]["attempts"][0]
    assert build["image"] == run["image"]
    assert "ARG VERSION" in build_log  # the engine's build output, streamed into the log
    assert f"pushed {run['image']}" in build_log
    integration = log_of(gateway, run["id"], "integration")
    assert "built version 1.2.3" in integration
    assert f"image={run['image']}" in integration


def test_a_dockerfile_that_fails_fails_the_build_stage_and_says_why(
    stack, gateway, make_repo, engine_with_base
):
    """A RUN step exiting 3: the build fails as `exit`, its error names the build, nothing
    is recorded as the run's image and integration never starts."""
    repo = image_repo(make_repo, engine_with_base, "RUN echo about-to-fail && exit 3\n",
                      service="broken-image")  # fmt: skip
    run = wait_for_run(gateway, start_run(gateway, repo), timeout=600)
    assert run["status"] == "failed" and run["image"] is None
    build = run["stages"][0]
    assert build["name"] == "build" and build["status"] == "failed"
    attempt = build["attempts"][0]
    assert attempt["reason"] == "exit" and "did not build" in attempt["error"]
    assert "about-to-fail" in log_of(gateway, run["id"], "build")
    assert not run["stages"][1]["attempts"]  # integration never started
