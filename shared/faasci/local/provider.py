"""Every deployed function as its own process, as faasd does with containers: a build
context laid out as faas-cli's shrinkwrap would (index.py + function/), the function's
environment and only its own secrets, and a restart whenever the process dies.

Functions are deployed, updated, scaled and removed at run time (the gateway's /system
API); at start every function of stack.yml is deployed. Instances are made only by
`function_instance`, so another kind (a container running the image) can be plugged in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import psutil
import urllib3

from .. import shell
from ..errors import Conflict, NotFound, UserError
from ..stack import FunctionSpec, Stack
from .config import LocalConfig

log = logging.getLogger("faasci.provider")

TEMPLATE = "python3-ci"
DRAIN_S = 15  # how long a stopping function may finish the requests it holds
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class NotSupported(UserError):
    """A request this provider cannot carry out (another one could)."""

    status = 501


class FunctionInstance:
    """What the provider keeps of one running function, whatever runs it (a process here,
    a container in containers.py): prepare(), start(), ready(), stop(), and `proc` with
    poll() and pid while it runs."""

    def __init__(self, spec: FunctionSpec, port: int, cfg: LocalConfig):
        self.spec, self.port, self.cfg = spec, port, cfg
        self.proc = None
        self.started_at = 0.0
        self.restarts = 0
        self.invocations = 0
        self.backoff = 0.0  # seconds before the next restart; doubles while crash-looping
        self.restart_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def secrets(self) -> Path:
        """This function's secrets only, one file each (its /var/openfaas/secrets)."""
        return self.cfg.run / "secrets" / self.spec.name

    def copy_secrets(self) -> None:
        shutil.rmtree(self.secrets, ignore_errors=True)
        self.secrets.mkdir(parents=True, mode=0o700)
        for name in self.spec.secrets:
            source = self.cfg.secrets_dir / name
            if not source.is_file():
                raise UserError(
                    f"function {self.spec.name} needs secret {name!r}: no file {source}", "secrets"
                )
            shutil.copyfile(source, self.secrets / name)
            os.chmod(self.secrets / name, 0o600)

    def ready(self) -> bool:
        """Can it take work? Its own answer on /_/ready (dependencies included)."""
        url = f"{self.url}/_/ready"
        try:
            return urllib3.request("GET", url, timeout=1, retries=False).status == 200
        except urllib3.exceptions.HTTPError:
            return False


class FunctionProcess(FunctionInstance):
    proc: subprocess.Popen | None

    @property
    def workdir(self) -> Path:
        """Checkouts and the process groups of running commands (a container's disk)."""
        return self.cfg.workdir / self.spec.name

    def kill_orphans(self) -> None:
        """Kill the commands a dead function process left running. In a container they die
        with it; here they live in process groups of their own, recorded in pgid files."""
        for pgid_file in self.workdir.glob("*/pgid"):
            if (group := shell.kill_recorded(pgid_file)) is not None:
                log.warning("function %s: killed orphaned commands (group %s)",
                            self.spec.name, group)  # fmt: skip
            pgid_file.unlink(missing_ok=True)

    @property
    def context(self) -> Path:
        return self.cfg.run / "functions" / self.spec.name

    def prepare(self) -> None:
        self.kill_orphans()  # left by a stack that was stopped hard
        ctx = self.context
        ctx.mkdir(parents=True, exist_ok=True)
        template = self.cfg.stack_file.parent / "template" / TEMPLATE
        shutil.copy2(template / "index.py", ctx / "index.py")  # a copy: Python resolves symlinks
        link = ctx / "function"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.spec.handler, target_is_directory=True)
        self.copy_secrets()

    def environment(self) -> dict[str, str]:
        cfg = self.cfg
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            **self.spec.environment,
            # The local stack's own addresses in place of the cluster's.
            # As in a cluster, where functions reach the gateway by its service address;
            # a test routes them through a proxy it can cut (FAASCI_FUNCTIONS_GATEWAY_URL).
            "GATEWAY_URL": os.environ.get("FAASCI_FUNCTIONS_GATEWAY_URL") or cfg.gateway_url,
            "PUBLIC_URL": cfg.gateway_url,
            "NATS_URL": cfg.nats_url,
            "S3_ENDPOINT": cfg.s3_url,
            "FAASCI_REGISTRY": cfg.registry,  # where the build stage pushes images
            "FAASCI_GITOPS_REPOSITORY": cfg.environments_repository,  # where promotions go
            # Its configuration: registry-retention collects blobs with it (faasci.retention).
            "FAASCI_REGISTRY_CONFIG": str(cfg.run / "registry.yml"),
            "VAULT_ADDR": cfg.vault_url,
            "OIDC_ISSUER": cfg.oidc_issuer,  # the local OIDC provider (oidc.py)
            "OIDC_AUDIENCE": "faasci",
            "PORT": str(self.port),
            "BIND_ADDRESS": "127.0.0.1",
            "DRAIN_TIMEOUT": f"{DRAIN_S}s",  # the local grace period, not write_timeout's hours
            "HOSTNAME": f"{self.spec.name}-local",
            "FAASCI_FUNCTION": self.spec.name,
            "FAASCI_SECRETS_DIR": str(self.secrets),
            "FAASCI_WORKDIR": str(self.workdir),
            "FAASCI_SNAPSHOTS": str(cfg.data / "snapshots.git"),
            **cfg.stage_env(),
        }

    def start(self) -> None:
        self.cfg.logs.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.cfg.logs / f"{self.spec.name}.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "index.py"],
                cwd=self.context,
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # It dies with the gateway, even a gateway killed with SIGKILL: never an
                # orphan holding its port and serving work nobody records.
                preexec_fn=shell.die_with_parent(),
            )
        self.started_at = time.monotonic()
        (self.cfg.run / f"fn-{self.spec.name}.pid").write_text(str(self.proc.pid))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # it drains: finishes its requests, then exits
            try:
                self.proc.wait(DRAIN_S + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_orphans()


def _blocks(r: urllib3.BaseHTTPResponse, size: int = 1 << 16) -> Iterator[bytes]:
    """A streamed response's body as it arrives, the connection closed at the end (or
    when the consumer closes the iterator: a client that left)."""
    try:
        yield from r.stream(size, decode_content=False)
    except Exception as e:  # the function died mid-answer: the client sees a short body
        log.warning("a streamed response from %s broke off: %s", r.url, e)
    finally:
        r.close()
        r.release_conn()


def stale_functions(cfg: LocalConfig) -> list[psutil.Process]:
    """Function processes of this stack that run (their working folder is one of its build
    contexts) though no gateway of this process started them: left by an earlier gateway."""
    root = os.path.realpath(cfg.run / "functions") + os.sep
    found = []
    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and (cwd + os.sep).startswith(root) and proc.pid != os.getpid():
            found.append(proc)
    return found


def kill_stale(cfg: LocalConfig) -> int:
    """Kill what an earlier gateway of this stack left running: its function processes
    first (so none records its commands' death as their failure; the lost attempts are
    retried by their leases), then the commands they ran (their pgid files). The number of
    function processes killed."""
    found = [] if cfg.containers else stale_functions(cfg)
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(found, timeout=5)
    for pgid_file in cfg.workdir.glob("*/*/pgid"):
        shell.kill_recorded(pgid_file)
        pgid_file.unlink(missing_ok=True)
    return len(found)


def function_instance(spec: FunctionSpec, port: int, cfg: LocalConfig) -> FunctionInstance:
    """The one place instances are made. Processes run a handler folder of stack.yml;
    in containers mode (`faasci up --containers`) a container runs the function's image.
    A function that is not in stack.yml (deployed by image alone) is a container of its
    image in either mode."""
    if spec.handler is None:
        if not spec.image:
            raise UserError(f"function {spec.name!r} is not in {cfg.stack_file}: deploy it "
                            "with an image", "image")  # fmt: skip
        from .containers import ImageContainer  # the docker SDK, needed for these only

        return ImageContainer(spec, port, cfg)
    if cfg.containers:
        from .containers import FunctionContainer

        return FunctionContainer(spec, port, cfg)
    return FunctionProcess(spec, port, cfg)


def function_ports(cfg: LocalConfig, stack: Stack) -> dict[str, int]:
    """The port of each function of stack.yml: the gateway's next ones, in the file's order
    (Prometheus scrapes them: prometheus.py)."""
    return {name: cfg.gateway_port + 1 + i for i, name in enumerate(stack.functions)}


@dataclass
class Deployment:
    """A deployed function: its instance (at most one replica locally) and since when."""

    instance: FunctionInstance
    replicas: int = 1
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def running(self) -> bool:
        proc = self.instance.proc
        return self.replicas > 0 and proc is not None and proc.poll() is None


class Provider:
    def __init__(self, cfg: LocalConfig, stack: Stack):
        self.cfg, self.stack = cfg, stack
        # One port per function, kept across redeployments.
        self.ports = function_ports(cfg, stack)
        self.functions: dict[str, Deployment] = {}
        self._lock = threading.RLock()  # deployments change under it; the supervisor too
        self._stopping = threading.Event()
        # urllib3 itself, not requests: every hop passes here, and requests' own work on a
        # call (~0.4 ms of CPU) is more than urllib3's. Never a retry nor a redirect: the
        # function's answer, whatever it is, goes back as it came.
        self.http = urllib3.PoolManager(maxsize=64, retries=False)

    @property
    def orchestration(self) -> str:
        """What runs the functions, as /system/info reports it."""
        return "containers" if self.cfg.containers else "processes"

    def get(self, name: str) -> Deployment:
        if (deployment := self.functions.get(name)) is None:
            raise NotFound(f"function {name!r} not found", "function")
        return deployment

    def schedules(self) -> dict[str, str]:
        """The cron schedules of the deployed functions (from their annotations)."""
        return {n: s for n, d in list(self.functions.items()) if (s := d.instance.spec.schedule)}

    def invoke(
        self, name: str, path: str, method: str, query: str, headers: dict, body: bytes,
        stream: bool = False,
    ) -> tuple[int, dict, bytes | Iterator[bytes]]:  # fmt: skip
        """Call a function's process; ConnectionError when it is down or not deployed.
        `stream`: the response body as an iterator of blocks, read from the function as
        it is consumed (a large log passes through in constant memory); closing the
        iterator closes the connection."""
        deployment = self.functions.get(name)
        if deployment is None or deployment.replicas == 0:
            raise ConnectionError(f"function {name} is not deployed or scaled to zero")
        fn = deployment.instance
        fn.invocations += 1
        try:
            r = self.http.request(
                method,
                f"{fn.url}/{path}" + (f"?{query}" if query else ""),
                body=body,
                headers=headers,
                timeout=urllib3.Timeout(connect=5, read=6 * 3600),
                redirect=False,
                preload_content=not stream,
                decode_content=False,  # passed on as it came, its Content-Encoding with it
            )
        except urllib3.exceptions.HTTPError as e:  # refused, reset, or cut off
            raise ConnectionError(f"function {name} is not reachable") from e
        kept = {k: v for k, v in r.headers.itermerged() if k.lower() not in HOP_HEADERS}
        return r.status, kept, (_blocks(r) if stream else r.data)

    def deploy(self, spec: FunctionSpec, update: bool) -> bool:
        """Create (update=False) or update a function, as POST and PUT /system/functions do;
        True when a process was (re)started. An unchanged deployment keeps its process, so
        a repeated `faas-cli deploy` cuts no invocation short."""
        with self._lock:
            current = self.functions.get(spec.name)
            if update and current is None:
                raise NotFound(f"function {spec.name!r} not found", "service")
            if not update and current is not None:
                raise Conflict(f"function {spec.name!r} already exists; update it with PUT")
            if spec.handler is None and spec.name in self.stack.functions:
                spec = replace(spec, handler=self.stack.functions[spec.name].handler)
            # A function new to the stack (an image, in container mode) takes the next port.
            port = self.ports.get(spec.name, self.cfg.gateway_port + 1 + len(self.ports))
            instance = function_instance(spec, port, self.cfg)
            self._check_secrets(spec)
            self.ports[spec.name] = port
            if current is not None and current.instance.spec == spec:
                return False
            if current is None:
                current = self.functions[spec.name] = Deployment(instance)
            else:
                current.instance.stop()
                instance.invocations = current.instance.invocations
                current.instance = instance
            if current.replicas:
                instance.prepare()
                instance.start()
            log.info("deployed %s (%s)", spec.name, "updated" if update else "created")
            return current.replicas > 0

    def _check_secrets(self, spec: FunctionSpec) -> None:
        for name in spec.secrets:
            if not (self.cfg.secrets_dir / name).is_file():
                raise UserError(f"secret {name!r} of function {spec.name!r} not found", "secrets")

    def remove(self, name: str) -> None:
        with self._lock:
            self.get(name).instance.stop()
            del self.functions[name]
        log.info("removed %s", name)

    def scale(self, name: str, replicas: int) -> int:
        """0 stops the function's process, more starts it (one process locally); the
        replicas it now has."""
        with self._lock:
            deployment = self.get(name)
            wanted = min(replicas, 1)
            if wanted != deployment.replicas:
                deployment.replicas = wanted
                fn = deployment.instance
                if wanted:
                    fn.restart_at = 0
                    fn.prepare()
                    fn.start()
                else:
                    fn.stop()
                log.info("scaled %s to %d", name, wanted)
            return wanted

    def start(self) -> None:
        """Replace what an earlier gateway left, deploy every function of stack.yml, then
        watch them."""
        if killed := kill_stale(self.cfg):
            log.warning("killed %d function processes an earlier gateway left", killed)
        for spec in self.stack.functions.values():
            try:
                self.deploy(spec, update=False)
            except UserError as e:
                raise SystemExit(e.message) from None
        threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()

    def _supervise(self) -> None:
        """Restart a function whose process died, as Kubernetes restarts a crashed pod: at
        once after a long life, with a doubling back-off (up to 30 s) when it keeps dying."""
        while not self._stopping.wait(0.2):
            with self._lock:
                now = time.monotonic()
                for deployment in self.functions.values():
                    fn = deployment.instance
                    if deployment.replicas == 0 or fn.proc is None or fn.proc.poll() is None:
                        continue
                    if now < fn.restart_at:
                        continue
                    if fn.restart_at == 0:  # just noticed
                        fn.kill_orphans()
                        crashlooping = now - fn.started_at < 10
                        fn.backoff = min(max(fn.backoff * 2, 0.5), 30) if crashlooping else 0
                        fn.restart_at = now + fn.backoff
                        log.warning(
                            "function %s exited with %s; restarting in %.1fs",
                            fn.spec.name,
                            fn.proc.returncode,
                            fn.backoff,
                        )
                        continue
                    fn.restarts += 1
                    fn.restart_at = 0
                    fn.start()

    def stop(self) -> None:
        """Stop every function at once, each given its drain (as pods of a node going down)."""
        self._stopping.set()
        with self._lock, ThreadPoolExecutor(max(1, len(self.functions))) as pool:
            list(pool.map(lambda deployment: deployment.instance.stop(), self.functions.values()))
