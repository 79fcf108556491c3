"""Where the local stack lives and listens. Everything can be moved by environment
variables, so tests run a second stack beside a developer's."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .. import stack


def find_stack_file(start: Path | None = None) -> Path:
    if os.environ.get("FAASCI_STACK"):
        return Path(os.environ["FAASCI_STACK"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "stack.yml").is_file():
            return folder / "stack.yml"
    raise SystemExit("no stack.yml here or above; set FAASCI_STACK")


MEMORY_FS = Path("/dev/shm")


def scratch_root() -> Path:
    """Where the functions' scratch goes. Each attempt makes and removes a few dozen files;
    on ext4 without a journal (these machines' disk) making one costs up to 0.8 ms of CPU
    while many were removed in the last minutes (it skips their inodes one by one), 30
    times what it costs in memory. That was a third of a trivial stage's CPU under load."""
    if os.path.ismount(MEMORY_FS) and os.access(MEMORY_FS, os.W_OK):
        return MEMORY_FS
    return Path(tempfile.gettempdir())


def memory_quarter() -> int:
    """A quarter of the memory file system, in bytes."""
    fs = os.statvfs(MEMORY_FS)
    return fs.f_frsize * fs.f_blocks // 4


def stack_tag(home: Path) -> str:
    """A short name for the stack whose data lives in `home`."""
    return hashlib.sha256(str(home).encode()).hexdigest()[:10]


def scratch_of(home: Path) -> Path:
    """The functions' scratch space of the stack whose data lives in `home`."""
    return scratch_root() / f"faasci-work-{stack_tag(home)}"


@dataclass(frozen=True)
class LocalConfig:
    stack_file: Path
    home: Path
    gateway_url: str
    nats_port: int
    s3_port: int
    secrets_dir: Path
    containers: bool = False  # functions run as containers of their images (up --containers)
    oidc_port: int = 8444  # the local OpenID Connect provider (oidc.py)
    vault_port: int = 8200  # the local OpenBao (openbao.py)
    registry_port: int = 5000  # the local image registry (Distribution's docker-registry)
    git_port: int = 9418  # git daemon serving the environment repository (promotions)
    prometheus_port: int = 9090  # Prometheus scraping the stack (up --observe: prometheus.py)
    # `faasci up --observe`: Jaeger (jaeger.py) and Prometheus run beside the stack, and the
    # functions export their spans to Jaeger's OTLP/HTTP port; its UI and API on jaeger_ui_port.
    observe: bool = False
    jaeger_otlp_port: int = 4318
    jaeger_ui_port: int = 16686  # its query gRPC port is the one below (16685), as Jaeger's

    @classmethod
    def from_env(cls, stack_file: Path | None = None) -> LocalConfig:
        stack_file = stack_file or find_stack_file()
        home = Path(os.environ.get("FAASCI_HOME") or stack_file.parent / ".faasci").resolve()
        gateway = os.environ.get("OPENFAAS_URL") or stack.load(stack_file).gateway
        return cls(
            stack_file=stack_file,
            home=home,
            gateway_url=gateway.rstrip("/"),
            nats_port=int(os.environ.get("FAASCI_NATS_PORT", "4222")),
            s3_port=int(os.environ.get("FAASCI_S3_PORT", "8333")),
            secrets_dir=Path(os.environ.get("FAASCI_SECRETS_DIR") or home / "secrets").resolve(),
            containers=os.environ.get("FAASCI_CONTAINERS") == "1",
            oidc_port=int(os.environ.get("FAASCI_OIDC_PORT", "8444")),
            vault_port=int(os.environ.get("FAASCI_VAULT_PORT", "8200")),
            registry_port=int(os.environ.get("FAASCI_REGISTRY_PORT", "5000")),
            git_port=int(os.environ.get("FAASCI_GIT_PORT", "9418")),
            prometheus_port=int(os.environ.get("FAASCI_PROMETHEUS_PORT", "9090")),
            observe=os.environ.get("FAASCI_OBSERVE") == "1",
            jaeger_otlp_port=int(os.environ.get("FAASCI_JAEGER_OTLP_PORT", "4318")),
            jaeger_ui_port=int(os.environ.get("FAASCI_JAEGER_UI_PORT", "16686")),
        )

    @property
    def gateway_port(self) -> int:
        return urlparse(self.gateway_url).port or 8080

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def oidc_issuer(self) -> str:
        """The local OIDC provider's issuer: every token's `iss`, exactly."""
        return f"http://127.0.0.1:{self.oidc_port}"

    @property
    def vault_url(self) -> str:
        return f"http://127.0.0.1:{self.vault_port}"

    @property
    def registry(self) -> str:
        """The local registry as image references start with it (host:port, plain HTTP)."""
        return f"127.0.0.1:{self.registry_port}"

    @property
    def environments_repository(self) -> str:
        """The environment repository promote stages push to, over git's own protocol."""
        return f"git://127.0.0.1:{self.git_port}/environments.git"

    # Folders under home: data survives `faasci down`; run holds pid files.
    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def tag(self) -> str:
        """Tells this stack's things apart from another's on one machine (by its home)."""
        return stack_tag(self.home)

    @property
    def workdir(self) -> Path:
        """Scratch space of the functions (checkouts, unpacked caches), not data worth
        keeping: in memory, like a pod's `emptyDir: {medium: Memory}`, where the machine has
        a memory file system (else its temp folder)."""
        return scratch_of(self.home)

    @property
    def in_memory(self) -> bool:
        return self.workdir.is_relative_to(MEMORY_FS)

    @property
    def cache_dir(self) -> Path:
        """The node-local layer of dependency caches, shared by every function here."""
        return self.workdir / "cache"

    def stage_env(self) -> dict[str, str]:
        """What the functions that run stages need to know of this machine: its cache
        layer, what stages must not see (the stack's own state), the container engine."""
        from .engine import Engine  # the engine's module needs this one

        return {
            "FAASCI_CACHE_DIR": str(self.cache_dir),
            # In memory, the cache layer may fill a quarter of it (on disk: the default).
            **({"FAASCI_CACHE_MAX_BYTES": str(memory_quarter())} if self.in_memory else {}),
            "FAASCI_SANDBOX_HIDE": f"{self.home}:{self.workdir}",
            "DOCKER_HOST": Engine.for_stack(self).docker_host,
            # Trivy's cache, with the offline database `up` writes (faasci.scan).
            "TRIVY_CACHE_DIR": str(self.trivy_cache),
            # Spans leave a function only when the stack observes (faasci.tracing);
            # FAASCI_TRACING=off (the benchmark's comparison) turns tracing off in all of them.
            **({"OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint} if self.observe else {}),
            **({"FAASCI_TRACING": v} if (v := os.environ.get("FAASCI_TRACING")) else {}),
            # FAASCI_METRICS=off likewise turns the functions' metrics off (faasci.metrics).
            **({"FAASCI_METRICS": v} if (v := os.environ.get("FAASCI_METRICS")) else {}),
        }

    @property
    def trivy_cache(self) -> Path:
        return self.home / "trivy"

    def env(self) -> dict[str, str]:
        """The environment that points a process (the gateway, the CLI) at this stack."""
        return {
            "FAASCI_STACK": str(self.stack_file),
            "FAASCI_HOME": str(self.home),
            "OPENFAAS_URL": self.gateway_url,
            "FAASCI_NATS_PORT": str(self.nats_port),
            "FAASCI_S3_PORT": str(self.s3_port),
            "FAASCI_SECRETS_DIR": str(self.secrets_dir),
            "FAASCI_CONTAINERS": "1" if self.containers else "0",
            "FAASCI_OIDC_PORT": str(self.oidc_port),
            "FAASCI_VAULT_PORT": str(self.vault_port),
            "FAASCI_REGISTRY_PORT": str(self.registry_port),
            "FAASCI_GIT_PORT": str(self.git_port),
            "FAASCI_PROMETHEUS_PORT": str(self.prometheus_port),
            "FAASCI_OBSERVE": "1" if self.observe else "0",
            "FAASCI_JAEGER_OTLP_PORT": str(self.jaeger_otlp_port),
            "FAASCI_JAEGER_UI_PORT": str(self.jaeger_ui_port),
        }

    @property
    def otlp_endpoint(self) -> str:
        """Where the functions send their spans when observing (OTLP over HTTP, Jaeger)."""
        return f"http://127.0.0.1:{self.jaeger_otlp_port}"

    @property
    def jaeger_url(self) -> str:
        """Jaeger's UI and query API (/api/traces/<trace id>)."""
        return f"http://127.0.0.1:{self.jaeger_ui_port}"


def tool(name: str) -> str:
    """A program installed beside this Python (nats-server and weed come from pip)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{name} is not installed in {path.parent}; run ./scripts/install")
    return str(path)


def openfaas_tool(name: str) -> str | None:
    """A real OpenFaaS program (faas-cli, of-watchdog, cron-connector): from OPENFAAS_BIN
    (default: ../shared/openfaas/bin beside this checkout), else from PATH; None when absent.
    The local stack runs without them; the tests always have them."""
    folder = os.environ.get("OPENFAAS_BIN") or str(
        Path(__file__).resolve().parents[4] / "shared" / "openfaas" / "bin"
    )
    path = Path(folder) / name
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    return shutil.which(name)
