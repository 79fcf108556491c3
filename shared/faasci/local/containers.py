"""A function of stack.yml as a container behind the local gateway (`faasci up --containers`),
a provider.FunctionInstance like provider.FunctionProcess, so the provider supervises either.

Each container runs the function's image (built by engine.build_functions) with:
  network   podman's slirp4netns with host loopback allowed: a network namespace of its own
            (of-watchdog binds 8081 for metrics in every container), 8080 published on
            127.0.0.1:<function port>, and the stack's 127.0.0.1 services at 10.0.2.2
  user      the host user's uid:gid, so it writes the snapshot store as the stack does
  mounts    its own secrets read-only at /var/openfaas/secrets; the snapshot store
            (<home>/data/snapshots.git) read-write; the project (the stack file's folder)
            and the folders in FAASCI_LOCAL_REPOS (space-separated) read-only; each at its
            host path, so a local path given to `faasci run` means the same inside
  logs      followed into <home>/logs/<function>.log (what /system/logs reads)
A container that exits is replaced by a new one when the provider restarts it, and
removed on stop.

A function deployed by image alone (not in stack.yml: a service the deploy stage rolls out)
runs as an ImageContainer, in either mode: its image pulled from the registry, nothing of
the stack's given to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import requests

from .. import stack
from ..errors import UserError
from ..stack import FunctionSpec
from .config import LocalConfig
from .engine import Engine, EngineError, build_functions
from .provider import FunctionInstance

log = logging.getLogger("faasci.containers")

NETWORK = "slirp4netns:allow_host_loopback=true"
HOST_FROM_CONTAINER = "10.0.2.2"  # slirp4netns's address of the host's loopback
SECRETS_MOUNT = "/var/openfaas/secrets"
STOP_GRACE_S = 10  # SIGTERM lets of-watchdog drain; SIGKILL after this
# A container start takes a second or two; one that has not started in this long (seen
# in CI: created, never started) is removed and started again by the provider.
START_S = 60
LABEL = "faasci.home"


def local_repos(cfg: LocalConfig) -> list[Path]:
    """Folders mounted read-only at their own path: the project and FAASCI_LOCAL_REPOS."""
    folders = [cfg.stack_file.parent, *map(Path, os.environ.get("FAASCI_LOCAL_REPOS", "").split())]
    return list(dict.fromkeys(f.resolve() for f in folders if f.is_dir()))


class ContainerProc:
    """What the provider reads of a running function (`proc.poll()`, `proc.pid`,
    `proc.returncode`), for a container: the exit code arrives when it exits."""

    def __init__(self, container, returncode: int | None = None):
        self.container = container
        self.pid = container.attrs["State"]["Pid"] if container else None  # on the host
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


class FunctionContainer(FunctionInstance):
    proc: ContainerProc | None

    def __init__(self, spec: FunctionSpec, port: int, cfg: LocalConfig):
        super().__init__(spec, port, cfg)
        self.engine = Engine.for_stack(cfg)

    @property
    def name(self) -> str:
        return f"faasci-{self.cfg.tag}-{self.spec.name}"

    @property
    def snapshots(self) -> Path:
        return self.cfg.data / "snapshots.git"

    def kill_orphans(self) -> None:
        """Nothing to do: a container's commands die with it."""

    def prepare(self) -> None:
        if not self.engine.has_image(self.spec.image):
            raise UserError(f"image {self.spec.image} of function {self.spec.name} is not "
                            f"in the local engine ({self.engine.folder})", "image")  # fmt: skip
        self.remove()  # left by a stack that was stopped hard
        self.copy_secrets()
        self.snapshots.mkdir(parents=True, exist_ok=True)  # a mount needs its source
        (self.cfg.workdir / self.spec.name).mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        cfg, host = self.cfg, HOST_FROM_CONTAINER
        return {
            **self.spec.environment,
            # The local stack's servers, as the container reaches them.
            "NATS_URL": f"nats://{host}:{cfg.nats_port}",
            "S3_ENDPOINT": f"http://{host}:{cfg.s3_port}",
            # The host's engine pushes (not the container): the registry as the host sees it.
            "FAASCI_REGISTRY": cfg.registry,
            "FAASCI_GITOPS_REPOSITORY": f"git://{host}:{cfg.git_port}/environments.git",
            "VAULT_ADDR": f"http://{host}:{cfg.vault_port}",
            # Tokens name the issuer as the host sees it (127.0.0.1), which is the
            # container's own loopback here: its keys are fetched at the host's address.
            "OIDC_ISSUER": cfg.oidc_issuer,
            "OIDC_AUDIENCE": "faasci",
            "OIDC_JWKS_URL": f"http://{host}:{cfg.oidc_port}/jwks",
            # Spans to Jaeger, when the stack observes (faasci.tracing).
            **(
                {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{host}:{cfg.jaeger_otlp_port}"}
                if cfg.observe
                else {}
            ),
            # The project is mounted (local_repos), and with it the stack's home when it
            # lies inside: its secrets folder and OpenBao's keys. Stages must not see it.
            "FAASCI_SANDBOX_HIDE": str(cfg.home),
            "GATEWAY_URL": f"http://{host}:{cfg.gateway_port}",
            "PUBLIC_URL": cfg.gateway_url,  # links people follow from the host
            "FAASCI_FUNCTION": self.spec.name,
            "FAASCI_SNAPSHOTS": str(self.snapshots),
            # Checkouts and the node-local cache layer on the host's disk, as a node's
            # hostPath/emptyDir would be: overlayfs cannot keep its upper layer on the
            # container's own (overlay) root.
            "FAASCI_WORKDIR": str(cfg.workdir / self.spec.name),
            "FAASCI_CACHE_DIR": str(cfg.cache_dir),
            "HOME": "/tmp",  # the host uid has no home in the image
            # Mounted repositories belong to the host user, not to the container's: git
            # refuses them ("dubious ownership") unless told they are safe.
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "safe.directory",
            "GIT_CONFIG_VALUE_0": "*",
        }

    def volumes(self) -> dict[str, dict[str, str]]:
        mounts = {str(repo): {"bind": str(repo), "mode": "ro"} for repo in local_repos(self.cfg)}
        mounts[str(self.secrets)] = {"bind": SECRETS_MOUNT, "mode": "ro"}
        mounts[str(self.snapshots)] = {"bind": str(self.snapshots), "mode": "rw"}
        mounts[str(self.cfg.workdir)] = {"bind": str(self.cfg.workdir), "mode": "rw"}
        return mounts

    def start(self) -> None:
        self.remove()  # the dead container a restart replaces
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        try:
            container = self._run()
        except docker.errors.APIError as e:
            # E.g. its port still held a moment by the container it replaces: reported as
            # an exit (podman's 125), so the provider retries with its back-off.
            log.error("function %s: its container did not start: %s", self.spec.name, e)
            with (self.cfg.logs / f"{self.spec.name}.log").open("a") as out:
                out.write(f"faasci: the container did not start: {e}\n")
            self.proc = ContainerProc(None, returncode=125)
            return
        self.proc = ContainerProc(container)
        (self.cfg.run / f"fn-{self.spec.name}.pid").write_text(str(self.proc.pid))
        threading.Thread(target=self._follow, args=(self.proc,), daemon=True,
                         name=f"logs-{self.spec.name}").start()  # fmt: skip

    def _run(self):
        container = self.engine.client.containers.run(
            self.spec.image,
            name=self.name,
            detach=True,
            labels={LABEL: str(self.cfg.home), "faasci.function": self.spec.name},
            environment=self.environment(),
            user=f"{os.getuid()}:{os.getgid()}",
            network_mode=NETWORK,
            # A function deployed at run time, outside stack.yml, has no port yet (0): any.
            ports={"8080/tcp": ("127.0.0.1", self.port or None)},
            volumes=self.volumes(),
            # Stages make namespaces of their own (faasci.sandbox), whose /proc mount the
            # kernel refuses while the engine's masks cover parts of /proc.
            security_opt=["unmask=/proc/*"],
            # The snapshot store's parent takes git's temporary index files: a tmpfs, so
            # any uid can write there (the mount point podman makes is root's).
            tmpfs={str(self.cfg.data): "rw,mode=1777"},
        )
        container.reload()
        if not self.port:
            self.port = int(container.ports["8080/tcp"][0]["HostPort"])
        return container

    def _follow(self, proc: ContainerProc) -> None:
        """Append the container's output to its log until it exits; then its exit code."""
        try:
            with (self.cfg.logs / f"{self.spec.name}.log").open("ab") as out:
                for chunk in proc.container.logs(stream=True, follow=True):
                    out.write(chunk)
                    out.flush()
        except Exception as e:  # the stream broke: wait() below still tells when it ends
            log.warning("function %s: log stream ended: %s", self.spec.name, e)
        try:
            proc.returncode = proc.container.wait()["StatusCode"]
        except docker.errors.NotFound:  # removed meanwhile
            proc.returncode = -9
        except Exception as e:
            log.warning("function %s: lost its container: %s", self.spec.name, e)
            proc.returncode = -1

    def stop(self) -> None:
        """SIGTERM (of-watchdog stops taking requests and drains), SIGKILL after the grace;
        then the container is removed."""
        self.remove(grace=STOP_GRACE_S)

    def remove(self, grace: float = 0) -> None:
        try:
            container = self.engine.client.containers.get(self.name)
        except docker.errors.NotFound:
            return
        with contextlib.suppress(docker.errors.NotFound):  # gone meanwhile
            if grace:
                container.stop(timeout=grace)
            container.remove(force=True)


class ImageContainer(FunctionContainer):
    """A function deployed by image alone, in process mode too: a container of that image
    on the stack's engine, pulled from its registry (by digest, as the deploy stage names
    it; the local registry is an insecure one in the engine's registries.conf). It serves
    OpenFaaS's function contract, HTTP on 8080, published on 127.0.0.1:<its port>, and gets
    its own environment and secrets (/var/openfaas/secrets) only: none of the stack's
    addresses, folders or credentials, and its image's own user. The pull and start go on
    in the background, as a pod's do: until the server answers it has no available replica,
    and an image that cannot be pulled, or exits, is restarted with the provider's back-off."""

    def prepare(self) -> None:
        self.remove()  # left by a gateway that was stopped hard
        self.copy_secrets()

    def start(self) -> None:
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        self._stopped = threading.Event()
        self.proc = ContainerProc(None)  # no container yet: running, not ready
        threading.Thread(target=self._pull_and_run, args=(self.proc, self._stopped),
                         daemon=True, name=f"start-{self.spec.name}").start()  # fmt: skip

    def _pull_and_run(self, proc: ContainerProc, stopped: threading.Event) -> None:
        self.remove()  # the dead container a restart replaces
        try:
            self.engine.client.images.pull(self.spec.image)
            if stopped.is_set():
                return
            container = self._run()
        except (docker.errors.DockerException, requests.RequestException) as e:
            # As ErrImagePull, a port still held, or no start within START_S (a read
            # timeout): the provider starts it again, as Kubernetes restarts a pod.
            # The engine's own errors first: its APIError is a requests HTTPError too.
            why = str(e) if isinstance(e, docker.errors.DockerException) else f"within {START_S}s"
            log.error("function %s: %s did not start: %s", self.spec.name, self.spec.image, why)
            with (self.cfg.logs / f"{self.spec.name}.log").open("a") as out:
                out.write(f"faasci: {self.spec.image} did not start: {why}\n")
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                self.remove()  # one created but never started (an engine away leaves none)
            proc.returncode = 125  # set whatever happened above: the provider restarts on it
            return
        proc.container, proc.pid = container, container.attrs["State"]["Pid"]
        if stopped.is_set():  # stopped while it was starting
            self.remove()
            proc.returncode = -9
            return
        self._follow(proc)

    def _run(self):
        starter = docker.DockerClient(base_url=self.engine.docker_host, timeout=START_S)
        try:
            container = starter.containers.run(
                self.spec.image,
                name=self.name,
                detach=True,
                labels={LABEL: str(self.cfg.home), "faasci.function": self.spec.name},
                environment=self.spec.environment,
                network_mode="slirp4netns",  # a namespace of its own; no way to the host's loopback
                # An init as PID 1 (catatonit) passes SIGTERM on: a server that is PID 1 itself
                # would ignore it and hold every update for the whole stop grace.
                init=True,
                ports={"8080/tcp": ("127.0.0.1", self.port or None)},
                volumes={str(self.secrets): {"bind": SECRETS_MOUNT, "mode": "ro"}},
            )
        finally:
            starter.close()
        # Through the engine's own client from here on: its log stream and wait have no timeout.
        container = self.engine.client.containers.get(container.id)
        if not self.port:
            self.port = int(container.ports["8080/tcp"][0]["HostPort"])
        return container

    def ready(self) -> bool:
        """Its server answers HTTP on 8080 (any status: only the smoke request judges the
        answer). A TCP connect alone would not do: the port forwarder accepts it whether
        or not anything in the container listens."""
        try:
            requests.get(self.url, timeout=1)
            return True
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if getattr(self, "_stopped", None) is not None:
            self._stopped.set()
        super().stop()


def build_images(cfg: LocalConfig, say=print) -> None:
    """Build the image of every function of the stack (log: <home>/logs/images.log)."""
    functions = stack.load(cfg.stack_file).functions
    images = {name: spec.image for name, spec in functions.items()}
    engine, log_file = Engine.for_stack(cfg), cfg.logs / "images.log"
    say(f"building {len(images)} function images with podman ({engine.folder}; log: {log_file})")
    started = time.monotonic()
    try:
        build_functions(engine, cfg.stack_file, None, images, log_file, say)
    except EngineError as e:  # said in one line: what failed and where its log is
        raise SystemExit(f"faasci up --containers: {e}") from None
    say(f"images built in {time.monotonic() - started:.0f}s")


def remove_all(cfg: LocalConfig) -> int:
    """Remove every container of this stack (by label), e.g. after a gateway that was
    killed; the number removed. The engine's API service is stopped too."""
    engine = Engine.for_stack(cfg)
    if not engine.folder.is_dir():
        return 0
    found = engine.client.containers.list(all=True, filters={"label": f"{LABEL}={cfg.home}"})

    def remove(container) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)

    with ThreadPoolExecutor(8) as pool:  # about a second each: at once
        list(pool.map(remove, found))
    engine.stop()
    return len(found)
