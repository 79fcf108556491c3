"""Every function of stack.yml as its own process, as faasd does with containers: a build
context laid out as faas-cli's shrinkwrap would (index.py + function/), the function's
environment and only its own secrets, and a restart whenever the process dies."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from .. import shell
from ..stack import FunctionSpec, Stack
from .config import LocalConfig

log = logging.getLogger("faasci.provider")

TEMPLATE = "python3-ci"
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class FunctionProcess:
    def __init__(self, spec: FunctionSpec, port: int, cfg: LocalConfig):
        self.spec, self.port, self.cfg = spec, port, cfg
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.invocations = 0
        self.backoff = 0.0  # seconds before the next restart; doubles while crash-looping
        self.restart_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> Path:
        """Checkouts and the process groups of running commands (a container's disk)."""
        return self.cfg.workdir / self.spec.name

    def kill_orphans(self) -> None:
        """Kill the commands a dead function process left running. In a container they die
        with it; here they live in process groups of their own, recorded in pgid files."""
        for pgid_file in self.workdir.glob("*/pgid"):
            try:
                shell.kill_group(int(pgid_file.read_text()))
                log.warning(
                    "function %s: killed orphaned commands (group %s)",
                    self.spec.name,
                    pgid_file.read_text(),
                )
            except (ValueError, OSError):
                pass
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
        secrets = self.cfg.run / "secrets" / self.spec.name
        shutil.rmtree(secrets, ignore_errors=True)
        secrets.mkdir(parents=True, mode=0o700)
        for name in self.spec.secrets:
            source = self.cfg.secrets_dir / name
            if not source.is_file():
                raise SystemExit(
                    f"function {self.spec.name} needs secret {name!r}: no file {source}"
                )
            shutil.copyfile(source, secrets / name)
            os.chmod(secrets / name, 0o600)

    def environment(self) -> dict[str, str]:
        cfg = self.cfg
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            **self.spec.environment,
            # The local stack's own addresses in place of the cluster's.
            "GATEWAY_URL": cfg.gateway_url,
            "PUBLIC_URL": cfg.gateway_url,
            "NATS_URL": cfg.nats_url,
            "S3_ENDPOINT": cfg.s3_url,
            "PORT": str(self.port),
            "BIND_ADDRESS": "127.0.0.1",
            "HOSTNAME": f"{self.spec.name}-local",
            "FAASCI_FUNCTION": self.spec.name,
            "FAASCI_SECRETS_DIR": str(cfg.run / "secrets" / self.spec.name),
            "FAASCI_WORKDIR": str(self.workdir),
            "FAASCI_SNAPSHOTS": str(cfg.data / "snapshots.git"),
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
            )
        self.started_at = time.monotonic()
        (self.cfg.run / f"fn-{self.spec.name}.pid").write_text(str(self.proc.pid))

    def ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/_/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.kill_orphans()


class Provider:
    def __init__(self, cfg: LocalConfig, stack: Stack):
        self.cfg = cfg
        self.functions = {
            name: FunctionProcess(spec, cfg.gateway_port + 1 + i, cfg)
            for i, (name, spec) in enumerate(stack.functions.items())
        }
        self._stopping = threading.Event()
        self.http = requests.Session()
        self.http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))

    def invoke(
        self, name: str, path: str, method: str, query: str, headers: dict, body: bytes
    ) -> tuple[int, dict, bytes]:
        """Call a function's process; ConnectionError when it is down."""
        fn = self.functions[name]
        fn.invocations += 1
        try:
            r = self.http.request(
                method,
                f"{fn.url}/{path}" + (f"?{query}" if query else ""),
                data=body,
                headers=headers,
                timeout=(5, 6 * 3600),
            )
        except requests.ConnectionError as e:
            raise ConnectionError(f"function {name} is not reachable") from e
        kept = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
        return r.status_code, kept, r.content

    def start(self) -> None:
        for fn in self.functions.values():
            fn.prepare()
            fn.start()
        threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()

    def _supervise(self) -> None:
        """Restart a function whose process died, as Kubernetes restarts a crashed pod: at
        once after a long life, with a doubling back-off (up to 30 s) when it keeps dying."""
        while not self._stopping.wait(0.2):
            now = time.monotonic()
            for fn in self.functions.values():
                if fn.proc is None or fn.proc.poll() is None or now < fn.restart_at:
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
        self._stopping.set()
        for fn in self.functions.values():
            fn.stop()
