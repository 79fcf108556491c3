"""The build stage's image: the service's Dockerfile built with the docker SDK against the
engine at DOCKER_HOST (locally Podman's Docker-compatible API), tagged with the commit,
pushed to the registry, and from then on named only by the pushed manifest's digest
(`repository@sha256:…`), which is what later stages run and promote.

The build and push output streams into the stage log as it comes. A Dockerfile that fails
to build is the project's failure (`exit`, like a failing command); an engine or registry
that cannot be reached is the platform's (`infra`, retried).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests

from .pipeline import DockerBuild
from .registry import Registry
from .settings import settings

log = logging.getLogger("faasci.images")

DIGEST_PREFIX = "sha256:"
DIGEST_IN_STATUS = re.compile(r"digest: (sha256:[0-9a-f]{64})")


class BuildFailed(Exception):
    """The image was not built or pushed; `reason` is "exit" (the project's Dockerfile),
    "timeout" or "infra" (the engine or the registry)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Pushed:
    repository: str
    tag: str
    digest: str

    @property
    def ref(self) -> str:
        """How the run names the image from now on: immutable, by digest."""
        return f"{self.repository}@{self.digest}"


def repository_for(service: str, spec: DockerBuild) -> str:
    """Where the image goes: the pipeline's `repository`, else <FAASCI_REGISTRY>/<service>."""
    if spec.repository:
        return spec.repository
    registry = settings().registry.rstrip("/")
    return f"{registry}/{service.lower()}"


def pushed_for(service: str, spec: DockerBuild, commit: str) -> str | None:
    """The image an earlier build of `commit` pushed (tagged with it), by digest: what a
    one-stage run of a later stage (integration, promote, deploy) acts on. None when there is
    none, or the registry cannot say (the stage then says no image was built)."""
    repository = repository_for(service, spec)
    host, _, name = repository.partition("/")
    local = host.partition(":")[0] in ("127.0.0.1", "localhost")  # plain HTTP, as pushed
    try:
        digest = Registry(f"{'http' if local else 'https'}://{host}").digest_of(name, commit)
    except (requests.RequestException, KeyError) as e:
        log.warning("looking up %s:%s failed: %s", repository, commit[:12], e)
        return None
    return f"{repository}@{digest}" if digest else None


def build_and_push(spec: DockerBuild, service_dir: Path, repository: str, tag: str,
                   out: BinaryIO, timeout_s: float, cancel: threading.Event) -> Pushed:  # fmt: skip
    """Build `spec` in `service_dir` as repository:tag and push it; the pushed digest."""
    import docker  # only the build stage needs the engine

    deadline = time.monotonic() + timeout_s
    context = (service_dir / spec.context).resolve()
    dockerfile = (service_dir / spec.file).resolve()
    for path, what in ((context, "context"), (dockerfile, "file")):
        if not path.is_relative_to(service_dir.resolve()) or not path.exists():
            raise BuildFailed(f"docker.{what} {getattr(spec, what)!r} is not in the "
                              "service's folder of this commit", "exit")  # fmt: skip
    say(out, f"building {repository}:{tag} from {spec.file} (context {spec.context})")
    try:
        client = docker.from_env(timeout=max(int(timeout_s), 60))
        stream = client.api.build(
            path=str(context), dockerfile=str(dockerfile), tag=f"{repository}:{tag}",
            target=spec.target, buildargs=dict(spec.args), rm=True, forcerm=True, pull=False,
            # RUN steps reach package indexes as the stage's commands do (no other network
            # is set up on these machines; see ../shared/notes/local-services.md).
            network_mode="host", decode=True,
        )  # fmt: skip
        for chunk in _watched(stream, deadline, cancel, "building"):
            if "stream" in chunk:
                out.write(chunk["stream"].encode())
                out.flush()
            if "error" in chunk:
                raise BuildFailed(f"the image did not build: {chunk['error'].strip()}", "exit")
        digest = _push(client, repository, tag, out, deadline, cancel)
    except docker.errors.DockerException as e:
        raise BuildFailed(f"the container engine failed: {e}", "infra") from None
    pushed = Pushed(repository, tag, digest)
    say(out, f"pushed {pushed.ref}")
    return pushed


def _push(client, repository: str, tag: str, out: BinaryIO, deadline: float,
          cancel: threading.Event) -> str:  # fmt: skip
    """Push, and the manifest digest the registry reported. The engine reports a failed
    push inside the stream, never by raising: every line is checked."""
    digest = None
    stream = client.api.push(repository, tag=tag, stream=True, decode=True)
    for chunk in _watched(stream, deadline, cancel, "pushing"):
        if "error" in chunk:
            raise BuildFailed(f"pushing to {repository} failed: {chunk['error'].strip()}",
                              "infra")  # fmt: skip
        # Docker reports the digest in an `aux` line; Podman only in the status line
        # "<tag>: digest: sha256:… size: N".
        status = chunk.get("status") or ""
        found = (chunk.get("aux") or {}).get("Digest") or _digest_in(status)
        if found:
            digest = found
        if status and not chunk.get("progressDetail"):
            say(out, f"push: {chunk['status']}" + (f" {chunk['id']}" if chunk.get("id") else ""))
    if not digest or not digest.startswith(DIGEST_PREFIX):
        raise BuildFailed(f"pushing to {repository} reported no digest", "infra")
    return digest


def _digest_in(status: str) -> str | None:
    found = DIGEST_IN_STATUS.search(status)
    return found.group(1) if found else None


def _watched(stream, deadline: float, cancel: threading.Event, doing: str):
    """The engine's progress, until the stage's timeout or a cancel stops it."""
    for chunk in stream:
        if cancel.is_set():
            raise BuildFailed(f"cancelled while {doing}", "cancelled")
        if time.monotonic() > deadline:
            raise BuildFailed(f"timed out while {doing} the image", "timeout")
        yield chunk


def say(out: BinaryIO, line: str) -> None:
    out.write(f"[faas-ci] {line}\n".encode())
    out.flush()
