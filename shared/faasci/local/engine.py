"""The container engine: Podman behind its Docker-compatible API, driven by the `docker` SDK.

Everything lives in one folder (default `<FAASCI_HOME>/podman/`, or FAASCI_PODMAN_HOME):
its containers.conf, storage.conf and registries.conf, the image storage, and the socket
of one `podman system service` started once and reused (DOCKER_HOST=unix://<folder>/podman.sock).
registries.conf lists the local registries (plain HTTP) of every stack that used the folder.

Images are built offline from the build contexts of the real `faas-cli build --shrinkwrap`:
  localhost/faasci-base:bookworm   a debootstrap'ed Debian bookworm with python3, made once
  localhost/of-watchdog:<version>  the real of-watchdog binary, `FROM scratch`
  <the function's stack.yml image> each function, from its context in build/<fn>/
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker
import yaml

from . import processes
from .config import LocalConfig, openfaas_tool

BASE_IMAGE = "localhost/faasci-base:bookworm"
DEFAULT_REGISTRY = "127.0.0.1:5000"  # the local stack's registry on its default port
WATCHDOG_REPO = "localhost/of-watchdog"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The machine's own extra CAs (a TLS-inspecting egress proxy's, if any): copied into the
# base image, as a platform's base image would, so pip reaches PyPI from builds and stages.
EXTRA_CAS = Path("/usr/local/share/ca-certificates")


_engines: dict[Path, Engine] = {}


class EngineError(Exception):
    """The engine could not do what was asked; the message says what and where the log is."""


class Engine:
    def __init__(self, folder: Path, registries: Iterable[str] = ()):
        self.folder = folder.resolve()
        # The registries (host:port) pushed to over plain HTTP: the local stacks'.
        self.registries = {DEFAULT_REGISTRY, *registries}
        self._client: docker.DockerClient | None = None

    @classmethod
    def for_stack(cls, cfg: LocalConfig) -> Engine:
        """The stack's engine (one per folder and process, so its client is shared), which
        pushes to the stack's registry over plain HTTP."""
        folder = Path(os.environ.get("FAASCI_PODMAN_HOME") or cfg.home / "podman").resolve()
        if folder not in _engines:
            _engines[folder] = cls(folder)
        engine = _engines[folder]
        if cfg.registry not in engine.registries:  # another stack sharing the folder
            engine.registries.add(cfg.registry)
            engine._client = None  # the next client (start) makes the service list it
        return engine

    @property
    def socket(self) -> Path:
        return self.folder / "podman.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        """What points the podman CLI (and its service) at this folder's configuration."""
        return {
            "CONTAINERS_CONF": str(self.folder / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.folder / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.folder / "registries.conf"),
        }

    # --- configuration and the API service ------------------------------------------------

    def configure(self) -> bool:
        """runc (crun fails on these machines), cgroupfs and a file events log (no systemd),
        low default ulimits (raising RLIMIT_NOFILE is refused here), storage and locks in the
        folder, plain HTTP to this engine's `registries` and to those listed already (other
        stacks sharing the folder push there too). True if a file changed.

        File locks, because Podman's default is one /dev/shm/libpod_lock per machine, shared
        by every stack's engine: their lock numbers collided, and a container of one stack
        waited for ever to start while another stack's container held the same lock."""
        f = self.folder
        insecure = sorted(self.registries | self.listed_registries())
        for sub in ("storage", "run", "tmp"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        files = {
            "containers.conf": f"""[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{f}/events.log"
tmp_dir = "{f}/tmp"
lock_type = "file"
volume_path = "{f}/storage/volumes"
""",
            "storage.conf": f"""[storage]
driver = "overlay"
graphroot = "{f}/storage"
runroot = "{f}/run"
""",
            # No search registries (nothing is pulled by a short name); the local registries
            # of `docker-registry` speak plain HTTP.
            "registries.conf": "unqualified-search-registries = []\n"
            + "".join(f'\n[[registry]]\nlocation = "{r}"\ninsecure = true\n' for r in insecure),
        }
        changed = False
        for name, text in files.items():
            path = f / name
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                changed = True
        return changed

    def listed_registries(self) -> set[str]:
        """The insecure registries registries.conf lists now."""
        try:
            listed = tomllib.loads((self.folder / "registries.conf").read_text())
        except (FileNotFoundError, tomllib.TOMLDecodeError):
            return set()
        return {r["location"] for r in listed.get("registry", []) if r.get("insecure")}

    def podman(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """The podman CLI on this folder's storage (for what the API lacks, and for tests)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(["podman", *args], env={**os.environ, **self.env}, **kwargs)

    def running(self) -> bool:
        try:
            return docker.DockerClient(base_url=self.docker_host, timeout=5).ping()
        except Exception:
            return False

    def start(self) -> None:
        """Start `podman system service` unless this folder's one answers already; one that
        answers rereads its configuration if this engine's registries were new to it."""
        with self.lock():  # one process at a time rewrites the configuration
            changed = self.configure()
            if self.running():  # started earlier, or by another process meanwhile
                if changed:
                    self.reload()
                return
            if not shutil.which("podman"):
                raise EngineError("podman is not installed (./scripts/install installs it)")
            processes.stop(self.folder, "podman-service")
            if changed:  # containers made under other locks (an older configuration) get new ones
                self.podman("system", "renumber")
            self.socket.unlink(missing_ok=True)
            processes.start(
                self.folder,
                "podman-service",
                ["podman", "system", "service", "--time=0", self.docker_host],
                self.folder / "service.log",
                {**os.environ, **self.env},
            )
            try:
                processes.wait_until(self.running, 30, "podman system service")
            except TimeoutError as e:
                raise EngineError(f"{e}; log: {self.folder / 'service.log'}") from None

    def reload(self) -> None:
        """The running service keeps the registries.conf it read at its start: SIGHUP makes
        it read its configuration files again (Podman's StartWatcher; asynchronous)."""
        pid = processes.pid_of(self.folder, "podman-service")
        if pid:
            os.kill(pid, signal.SIGHUP)
            time.sleep(0.5)  # a push right away would still use the old list

    def stop(self) -> bool:
        """Stop the API service (containers keep running under their conmon)."""
        self._client = None
        stopped = processes.stop(self.folder, "podman-service")
        # containers/storage bind-mounts <storage>/overlay onto itself and leaves it: undo
        # that, so the folder can be deleted (refused, harmlessly, while containers run).
        subprocess.run(["umount", str(self.folder / "storage" / "overlay")], capture_output=True)
        return stopped

    @property
    def client(self) -> docker.DockerClient:
        if self._client is not None:
            try:
                self._client.ping()
            except Exception:  # the service was stopped (`faasci down`): start it again
                self._client = None
        if self._client is None:
            self.start()
            # Builds and stops can take long: no client-side timeout on the socket.
            self._client = docker.DockerClient(base_url=self.docker_host, timeout=None)
        return self._client

    @contextlib.contextmanager
    def lock(self, name: str = "lock") -> Iterator[None]:
        """One process at a time makes the service or the shared images."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / name, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def has_image(self, ref: str) -> bool:
        try:
            self.client.images.get(ref)
            return True
        except docker.errors.ImageNotFound:
            return False

    # --- images ----------------------------------------------------------------------------

    def ensure_base_image(self, say=print) -> str:
        """Debian bookworm (python3, venv, git, the machine's CAs) made with debootstrap
        and `podman import`ed once; nothing is pulled from a registry."""
        with self.lock("base.lock"):
            if self.has_image(BASE_IMAGE):
                return BASE_IMAGE
            if not shutil.which("debootstrap"):
                raise EngineError("debootstrap is not installed (./scripts/install installs it)")
            say(f"making {BASE_IMAGE} with debootstrap (once; about a minute)")
            rootfs, log = self.folder / "tmp" / "rootfs", self.folder / "debootstrap.log"
            shutil.rmtree(rootfs, ignore_errors=True)
            with log.open("w") as out:
                done = subprocess.run(
                    ["debootstrap", "--variant=minbase",
                     "--include=python3,python3-venv,ca-certificates,git",
                     "bookworm", str(rootfs)],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            if done.returncode != 0:
                raise EngineError(f"debootstrap failed; log: {log}")
            if EXTRA_CAS.is_dir():
                shutil.copytree(EXTRA_CAS, rootfs / "usr/local/share/ca-certificates",
                                dirs_exist_ok=True)  # fmt: skip
                subprocess.run(["chroot", str(rootfs), "update-ca-certificates"],
                               capture_output=True, check=True)  # fmt: skip
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (rootfs / cache).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            # Python's ssl and pip read the system bundle (which holds the copied CAs).
            env = f"SSL_CERT_FILE={CA_BUNDLE} PIP_CERT={CA_BUNDLE} REQUESTS_CA_BUNDLE={CA_BUNDLE}"
            imported = self.podman(
                "import",
                "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change", f"ENV {env}",
                "--change", 'CMD ["python3"]',
                "-", BASE_IMAGE,
                stdin=tar.stdout,
            )  # fmt: skip
            tar.wait()
            shutil.rmtree(rootfs, ignore_errors=True)
            if imported.returncode != 0 or tar.returncode != 0:
                raise EngineError(f"podman import {BASE_IMAGE}: {imported.stderr.strip()}")
            return BASE_IMAGE

    def ensure_watchdog_image(self) -> str:
        """localhost/of-watchdog:<version> from the real binary (openfaas_tool), so the
        template's `FROM ${WATCHDOG_IMAGE}` needs no registry."""
        binary = openfaas_tool("of-watchdog")
        if not binary:
            raise EngineError("of-watchdog not found in OPENFAAS_BIN or PATH")
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
        version = re.search(r"Version: (\S+)", out.stdout + out.stderr)
        if not version:
            raise EngineError(f"{binary} --version printed no version")
        image = f"{WATCHDOG_REPO}:{version.group(1)}"
        with self.lock("base.lock"):
            if not self.has_image(image):
                with tempfile.TemporaryDirectory(dir=self.folder / "tmp") as ctx:
                    shutil.copy2(binary, Path(ctx) / "of-watchdog")
                    (Path(ctx) / "Dockerfile").write_text(
                        'FROM scratch\nCOPY of-watchdog /fwatchdog\nENTRYPOINT ["/fwatchdog"]\n'
                    )
                    self.build(Path(ctx), image, self.folder / "watchdog-build.log")
        return image

    def build(self, context: Path, tag: str, log: Path, buildargs: dict | None = None) -> str:
        """Build `context` as `tag` with no image pulled, streaming the output to `log`;
        the image id. The host network lets pip reach PyPI from RUN steps."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as out:
            out.write(f"=== {tag} from {context} at {time.strftime('%H:%M:%S')}\n")
            stream = self.client.api.build(
                path=str(context), tag=tag, buildargs=buildargs or {}, rm=True, forcerm=True,
                pull=False, network_mode="host", decode=True,
            )  # fmt: skip
            for chunk in stream:
                if "stream" in chunk:
                    out.write(chunk["stream"])
                    out.flush()
                if "error" in chunk:
                    out.write(f"ERROR: {chunk['error']}\n")
                    error = chunk["error"].strip()
                    raise EngineError(f"building {tag} failed: {error}; log: {log}")
        return self.client.images.get(tag).id

    def prune(self) -> None:
        """Drop the dangling images that rebuilt tags leave behind."""
        self.client.images.prune(filters={"dangling": True})


# --- build contexts, as `faas-cli build --shrinkwrap` lays them out ----------------------


def shrinkwrap(stack_file: Path, work: Path, log: Path | None = None) -> Path:
    """Lay out build/<fn>/ for every function of `stack_file` in `work`, a fresh scratch
    copy of what faas-cli reads (the repository's own build/ is never touched): the real
    `faas-cli build --shrinkwrap` when it is installed, else `shrinkwrap_like_faas_cli`.
    Returns work/build."""
    project = stack_file.parent
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stack = yaml.safe_load(stack_file.read_text())
    needed = {"template", *(stack.get("configuration") or {}).get("copy", [])}
    for fn in stack["functions"].values():
        needed.add(fn["handler"])
        needed.update(fn.get("environment_file") or [])
    shutil.copy2(stack_file, work / stack_file.name)
    for rel in sorted(needed):
        src, dst = project / rel, work / rel
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "build"))  # fmt: skip
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    faas_cli = openfaas_tool("faas-cli")
    if faas_cli:
        done = subprocess.run(
            [faas_cli, "build", "--shrinkwrap", "-f", stack_file.name],
            cwd=work, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as out:
                out.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise EngineError(f"faas-cli build --shrinkwrap: {(done.stdout + done.stderr)[-800:]}")
    else:
        shrinkwrap_like_faas_cli(work / stack_file.name)
    return work / "build"


def envsubst(text: str) -> str:
    """drone/envsubst as faas-cli applies it to stack.yml: ${V}, ${V:-d}, ${V-d}, $V."""

    def repl(m: re.Match) -> str:
        name, op, default = m.group(1) or m.group(4), m.group(2), m.group(3)
        value = os.environ.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return default
        return value or ""

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}|\$([A-Za-z_]\w*)", repl, text)


def shrinkwrap_like_faas_cli(stack_file: Path) -> None:
    """faas-cli's createBuildContext, step for step, for machines without faas-cli: per
    function (skip_build ones skipped) a fresh build/<fn>/ holding template/<lang>/, the
    handler's entries (but build/ and template/) in <handler_folder or function>/, and each
    configuration.copy path inside that folder. Like faas-cli, the folders it makes are 0700,
    or 0777 less the umask when CI is "true" or "1" (faas-cli's concession to CI builders)."""
    root = stack_file.parent
    stack = yaml.safe_load(envsubst(stack_file.read_text()))
    if (stack.get("provider") or {}).get("name") != "openfaas":
        raise EngineError('stack: provider.name must be "openfaas"')
    copies = (stack.get("configuration") or {}).get("copy") or []
    folder_mode = 0o700
    if os.environ.get("CI") in ("true", "1"):
        umask = os.umask(0)
        os.umask(umask)
        folder_mode = 0o777 & ~umask
    for name, fn in stack["functions"].items():
        if fn.get("skip_build"):
            continue
        template = root / "template" / fn["lang"]
        meta = yaml.safe_load((template / "template.yml").read_text())
        handler = root / fn["handler"]
        if not handler.is_dir():
            raise EngineError(f"{name}: handler {fn['handler']} is not a folder")
        context = root / "build" / name
        shutil.rmtree(context, ignore_errors=True)
        function_path = context / (meta.get("handler_folder") or "function")
        function_path.mkdir(parents=True)
        shutil.copytree(template, context, dirs_exist_ok=True)
        for folder in (root / "build", context, function_path):  # copytree copied modes too
            folder.chmod(folder_mode)
        for entry in sorted(handler.iterdir()):
            if entry.name in ("build", "template"):
                continue
            if entry.is_dir():
                shutil.copytree(entry, function_path / entry.name, dirs_exist_ok=True)
            else:
                shutil.copy2(entry, function_path / entry.name)
        for extra in copies:
            shutil.copytree(root / extra, (function_path / extra).resolve(), dirs_exist_ok=True)


# --- the stack's images -------------------------------------------------------------------


def build_functions(
    engine: Engine, stack_file: Path, names: list[str] | None, images: dict[str, str],
    log: Path, say=print,
) -> dict[str, float]:  # fmt: skip
    """Shrinkwrap `stack_file` and build the named functions (default: all) into the tags in
    `images` ({function: tag}, as faas-cli tags them: the stack's `image`); seconds taken
    per function. The dependency layers are shared by every function of the template, so
    only the first build of a cold store is slow."""
    base = engine.ensure_base_image(say)
    watchdog = engine.ensure_watchdog_image()
    with engine.lock("build.lock"):  # one build at a time per engine (and scratch folder)
        build = shrinkwrap(stack_file, engine.folder / "work" / _slug(stack_file), log)
        args = {"BASE_IMAGE": base, "WATCHDOG_IMAGE": watchdog}
        took = {}
        for name in names or sorted(images):
            started = time.monotonic()
            engine.build(build / name, images[name], log, args)
            took[name] = time.monotonic() - started
        engine.prune()
    return took


def _slug(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(path.resolve())).strip("-")[-80:]


def main(argv: list[str] | None = None) -> int:
    """`python -m faasci.local.engine [function ...]`: build the images of the stack's
    functions (all by default) as `faasci up --containers` does; print time and size."""
    import argparse

    from .. import stack

    p = argparse.ArgumentParser(prog="bundle-check", description=main.__doc__.splitlines()[0])
    p.add_argument("functions", nargs="*", help="functions of stack.yml (default: all)")
    args = p.parse_args(argv)
    cfg = LocalConfig.from_env()
    functions = stack.load(cfg.stack_file).functions
    unknown = set(args.functions) - set(functions)
    if unknown:
        p.error(f"not in {cfg.stack_file}: {', '.join(sorted(unknown))}")
    images = {name: spec.image for name, spec in functions.items()}
    e = Engine.for_stack(cfg)
    log = e.folder / "build.log"
    took = build_functions(e, cfg.stack_file, args.functions, images, log)
    for name, seconds in took.items():
        size = e.client.images.get(images[name]).attrs["Size"]
        print(f"{name}: {images[name]} built in {seconds:.1f}s, {size / 1e6:.0f} MB")
    print(f"podman: {e.docker_host} (storage {e.folder / 'storage'}; build log {log})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
