"""The local stack's image registry (Distribution's docker-registry, started as `faasci up`
starts it) in a home of its own: /v2/ answers, `faasci status` lists it, an image pushed
through the tests' Podman over plain HTTP is there by the digest the push reported, and a
running engine learns a registry new to it. Images are `FROM scratch`: nothing is pulled."""

from __future__ import annotations

import os
import re

import pytest
import requests
from conftest import PORT_OFFSET, ROOT, registry_of_its_own

from faasci.local import control, processes, services
from faasci.local.config import LocalConfig
from faasci.local.engine import Engine

# A fixed port, not any free one: the shared engine folder lists each registry it pushed
# to (registries.conf) for good, so a new port every session would pile up there.
PORT = 24000 + PORT_OFFSET
ENGINE_HOME = ROOT / ".faasci" / f"podman-test{PORT_OFFSET or ''}"  # test_containers.py's
MANIFESTS = "application/vnd.docker.distribution.manifest.v2+json, " \
            "application/vnd.oci.image.manifest.v1+json"  # fmt: skip


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """The registry of a stack whose home is a temporary folder, stopped afterwards."""
    with registry_of_its_own(tmp_path_factory.mktemp("registry-home"), PORT) as cfg:
        yield cfg


@pytest.fixture(scope="module")
def engine(registry):
    """The tests' shared engine, told the registry is plain HTTP; stopped at the end if this
    module started it (test_bundle.py's way), else left to whoever did."""
    e = Engine(ENGINE_HOME, [registry.registry])
    was_running = e.running()
    e.start()
    yield e
    if not was_running:
        e.stop()


def build_scratch(client, ctx, ref: str) -> str:
    """A one-file image `FROM scratch` tagged `ref`; its id."""
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "hello.txt").write_text(f"hello from {ref}\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\n")
    image, _ = client.images.build(path=str(ctx), tag=ref, rm=True, forcerm=True, pull=False)
    return image.id


def push(client, repository: str, tag: str) -> tuple[str | None, list[dict]]:
    """Push `repository:tag`: the manifest digest the stream reported (Docker's `aux` line,
    or Podman's status "<tag>: digest: sha256:… size: N"), and every line of the stream.
    The SDK does not raise on a failed push: its errors are lines of the stream."""
    digest, lines = None, []
    for line in client.images.push(repository, tag=tag, stream=True, decode=True):
        lines.append(line)
        if "Digest" in (line.get("aux") or {}):
            digest = line["aux"]["Digest"]
        elif found := re.search(r"digest: (sha256:[0-9a-f]{64})", line.get("status", "")):
            digest = digest or found.group(1)
    return digest, lines


def manifest_digest(cfg: LocalConfig, name: str, tag: str) -> str:
    r = requests.get(f"http://{cfg.registry}/v2/{name}/manifests/{tag}",
                     headers={"Accept": MANIFESTS}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.headers["Docker-Content-Digest"]


def test_registry_answers_and_status_lists_it(registry):
    """/v2/ answers 200 on the stack's port; a second start is a no-op; `faasci status`
    shows the part `registry` up; its configuration binds 127.0.0.1 only."""
    assert requests.get(f"http://{registry.registry}/v2/", timeout=5).status_code == 200
    assert not services.start_registry(registry, dict(os.environ))
    part = control.status(registry)["parts"]["registry"]
    assert part == {"pid": processes.pid_of(registry.run, "registry"), "healthy": True}
    assert f"addr: {registry.registry}\n" in (registry.run / "registry.yml").read_text()


def test_push_through_the_engine_is_recorded_by_its_digest(registry, engine, tmp_path):
    """An image pushed to the registry through Podman (plain HTTP, registries.conf): the
    registry serves its manifest under the digest the push stream reported."""
    name, tag = "faasci-test/hello", f"t{os.getpid()}"
    ref = f"{registry.registry}/{name}:{tag}"
    client = engine.client
    build_scratch(client, tmp_path / "ctx", ref)
    try:
        digest, lines = push(client, f"{registry.registry}/{name}", tag)
        assert not [line for line in lines if "error" in line], lines
        assert digest and digest.startswith("sha256:"), lines
        assert manifest_digest(registry, name, tag) == digest
        # and by that digest, as a later stage names the image
        by_digest = manifest_digest(registry, name, digest)
        assert by_digest == digest
    finally:
        client.images.remove(ref, force=True)


def test_a_running_engine_learns_a_new_registry(registry, tmp_path):
    """A running service keeps the registries.conf it started with (a push over HTTP is
    refused); an engine that lists the registry makes it reread it, and the push works."""
    own = Engine(tmp_path / "podman")  # a folder of its own: the registry is new to it
    own.start()
    try:
        ref = f"{registry.registry}/faasci-test/learn:one"
        build_scratch(own.client, tmp_path / "ctx", ref)
        _, lines = push(own.client, f"{registry.registry}/faasci-test/learn", "one")
        assert "HTTP response to HTTPS client" in str(lines), lines

        told = Engine(tmp_path / "podman", [registry.registry])
        told.start()  # answers already: rewrites registries.conf and reloads it
        assert registry.registry in told.listed_registries()
        digest, lines = push(told.client, f"{registry.registry}/faasci-test/learn", "one")
        assert not [line for line in lines if "error" in line], lines
        assert manifest_digest(registry, "faasci-test/learn", "one") == digest
    finally:
        own.stop()
