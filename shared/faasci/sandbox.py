"""Where a stage's commands run: in an environment of the project's, not of faas-ci's.

Every command starts in namespaces of its own (util-linux `unshare`; unprivileged user
namespaces are all it needs, on a machine or in a container with an unmasked /proc):

- an outer user, mount and pid namespace, root inside it, where a set-up script
  - overlay-mounts the restored cache paths (lower: the node-local entry, upper: the
    attempt's own), so a stage never changes what it restored;
  - gives the command a /tmp of the attempt's, and shows the checkout and HOME at the
    one stable path of `settings().workspace` (`src/`, `home/`), whatever the attempt;
  - hides under empty tmpfs what stages must not see: the platform's secrets, faas-ci's
    own installation, the functions' work, snapshot and cache folders;
- then the command runs in an inner user namespace as the caller's own uid. The mounts
  above are locked there: it cannot unmount them to look underneath.
- The namespace has its own /proc (no other process is visible) and its pid 1 is the
  set-up shell: when the command ends, or the stage kills `unshare` (`--kill-child`), the
  kernel kills every process left inside, a `setsid` child or a double-forked daemon too.

The command's environment is clean: a PATH of the system's tools behind the project's own
`.venv/bin` and `node_modules/.bin`, HOME in the workspace, the pipeline's `env` and the
documented FAASCI_*/CI variables, nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import shell
from .settings import settings
from .usage import Usage, read_cgroup
from .usage import cgroup_dir as usage_cgroup_dir

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _tool(name: str) -> str:
    """A system tool by absolute path: the set-up script never looks in the project's
    folders on the stage's PATH (a project's own `mount` must not run as its root)."""
    return shutil.which(name, path=SYSTEM_PATH) or f"/usr/bin/{name}"


MOUNT, SETPRIV, UNSHARE, BASH = _tool("mount"), _tool("setpriv"), _tool("unshare"), _tool("bash")


def _fstab_field(text: str) -> str:
    """A path as an fstab field: whitespace and backslashes as octal escapes."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


def faasci_prefix() -> Path | None:
    """faas-ci's own virtualenv, when it runs from one."""
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else None


def system_path() -> str:
    """This process's PATH without faas-ci's virtualenv (nor any other virtualenv)."""
    keep = []
    for entry in os.environ.get("PATH", SYSTEM_PATH).split(":"):
        if entry and not (Path(entry).parent / "pyvenv.cfg").exists() and entry not in keep:
            keep.append(entry)
    return ":".join(keep) or SYSTEM_PATH


def stable_service_dir(service_path: str) -> Path:
    """Where a stage sees the service's folder (`service_path` inside the repository)."""
    return settings().workspace / "src" / service_path


def stage_path(service_dir: Path, system: str | None = None) -> str:
    """A stage's PATH: the project's own tools first, then the system's."""
    return f"{service_dir}/.venv/bin:{service_dir}/node_modules/.bin:{system or system_path()}"


@dataclass
class Overlay:
    """A restored cache path: `lower` (read-only, shared) seen read-write at `target`."""

    lower: Path
    target: Path  # in the attempt's real checkout or home


@dataclass
class Sandbox:
    """One attempt's sandbox: its folder (holding `src/`, `home/`, `tmp/`), the service's
    folder inside the checkout, and the cache paths to overlay."""

    attempt: Path
    service_path: str = ""  # the service's folder inside the repository
    overlays: list[Overlay] = field(default_factory=list)
    _ready: int | None = field(default=None, repr=False)  # the last launch's ready pipe

    @property
    def src(self) -> Path:
        return self.attempt / "src"

    @property
    def home(self) -> Path:
        return self.attempt / "home"

    @property
    def workspace(self) -> Path:
        return settings().workspace

    @property
    def service_dir(self) -> Path:
        """Where the commands run, as they see it (the stable path)."""
        return stable_service_dir(self.service_path)

    def system_path(self) -> str:
        """The system's tools, as the commands find them."""
        return system_path()

    def prepare(self) -> None:
        """The folders the set-up script mounts from and onto."""
        for folder in (self.home, self.attempt / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        self.workspace.mkdir(parents=True, exist_ok=True)
        for n, overlay in enumerate(self.overlays):
            overlay.target.mkdir(parents=True, exist_ok=True)
            for part in ("upper", "work"):
                (self.attempt / "overlay" / str(n) / part).mkdir(parents=True, exist_ok=True)

    def hidden(self) -> list[Path]:
        s = settings()
        paths = [s.secrets_dir, s.workdir, s.cache_dir, s.snapshots, faasci_prefix(),
                 *s.sandbox_hide]  # fmt: skip
        return sorted({Path(p) for p in paths if p}, key=lambda p: len(p.parts))

    def mounts(self) -> list[tuple[str, Path, str, str]]:
        """The set-up's mounts, in order: (source, target, type, options)."""
        table = []
        for n, overlay in enumerate(self.overlays):
            scratch = self.attempt / "overlay" / str(n)
            options = (f"userxattr,lowerdir={overlay.lower},upperdir={scratch / 'upper'},"
                       f"workdir={scratch / 'work'}")  # fmt: skip
            table.append(("faasci-cache", overlay.target, "overlay", options))
        ws = self.workspace
        table += [
            (str(self.attempt / "tmp"), Path("/tmp"), "none", "bind"),
            ("faasci-workspace", ws, "tmpfs", "mode=0755,size=64k,X-mount.mkdir"),
            # Opened before /tmp is covered: fds 3 and 4 of the set-up script.
            ("/proc/self/fd/3", ws / "src", "none", "rbind,X-mount.mkdir"),
            ("/proc/self/fd/4", ws / "home", "none", "rbind,X-mount.mkdir"),
        ]
        covered = [Path("/tmp")]  # the attempt's own /tmp covers what is under it
        for path in self.hidden():  # outermost first: what is inside one is hidden with it
            if path.is_dir() and not any(path.is_relative_to(c) for c in covered):
                table.append(("faasci-hidden", path, "tmpfs", "mode=0,size=4k"))
                covered.append(path)
        return table

    def fstab(self) -> str:
        """`mounts()` as an fstab: one `mount --all` makes them all (one process, not one
        per mount: a command's start is what a short stage spends its time on)."""
        return "".join(f"{_fstab_field(source)} {_fstab_field(str(target))} {kind} {options} 0 0\n"
                       for source, target, kind, options in self.mounts())  # fmt: skip

    def script(self, ready_fd: int, fstab: Path) -> str:
        """The set-up, run by bash as the outer namespace's root; "$1" is the command. Once
        everything is in place it writes to `ready_fd`, so a failed set-up is never taken
        for the command's own failure."""
        q = shlex.quote
        return (
            f"set -e\nexec 3<{q(str(self.src))} 4<{q(str(self.home))}\n"
            f"{MOUNT} --all --fstab {q(str(fstab))}\n"
            f"cd {q(str(self.service_dir))}\n"
            f"exec 3<&- 4<&-; printf ready >&{ready_fd}; exec {ready_fd}>&-\n"
            # pid 1 stays this shell: the command runs as its child, as the caller's uid.
            f"{UNSHARE} --user --map-user={os.getuid()} --map-group={os.getgid()} -- "
            '/bin/sh -c "$1" &\nwait $!\n'
        )

    def launch(self, command: str, env: dict[str, str], log: BinaryIO) -> shell.Process:
        """Start `command` in the sandbox (its own session, so the stage can kill `unshare`
        and with it everything inside)."""
        self.failed()  # forget an earlier command's
        fstab = self.attempt / "mounts.fstab"
        fstab.write_text(self.fstab())
        read, write = os.pipe()
        os.set_blocking(read, False)
        # Above fds 3 and 4, which the set-up script opens for itself.
        write, low = fcntl.fcntl(write, fcntl.F_DUPFD, 5), write
        os.close(low)
        argv = [
            # Killed with its function process (the parent-death signal survives the exec).
            # Set by setpriv rather than a preexec_fn, which would make Python fork this
            # whole process instead of vfork-ing it (~8 ms of CPU per command).
            SETPRIV, "--pdeathsig", "KILL", "--",
            UNSHARE, "--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child",
            "--mount-proc", "--propagation", "private",
            "--", BASH, "-c", self.script(write, fstab), "faasci-sandbox", command,
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                argv, env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(write,),
            )  # fmt: skip
        finally:
            os.close(write)
        self._ready = read
        return shell.Process(proc)

    def failed(self) -> bool:
        """Did the last command never start because its sandbox could not be made? (Asked
        once it has ended.)"""
        read, self._ready = self._ready, None
        if read is None:
            return False
        try:
            return os.read(read, 16) != b"ready"
        except BlockingIOError:
            return True
        finally:
            os.close(read)


@dataclass
class ImageSandbox(Sandbox):
    """A stage that names an `image:`: each command runs in a new container of it (docker
    SDK, engine at DOCKER_HOST), the checkout and HOME mounted at the same stable paths,
    as the caller's uid. Removing the container ends every process of the command. Cache
    paths are copied in (the engine mounts no overlay of ours)."""

    image: str = ""

    def prepare(self) -> None:
        super().prepare()
        for overlay in self.overlays:
            shutil.copytree(overlay.lower, overlay.target, symlinks=True, dirs_exist_ok=True)
        self.overlays = []

    def system_path(self) -> str:
        """The image's own PATH (pulled first when the engine lacks it, as an image named
        by digest from the registry may be)."""
        import docker

        try:
            found = _docker().images.get(self.image)
        except docker.errors.ImageNotFound:
            found = _docker().images.pull(self.image)
        config = found.attrs.get("Config") or {}
        env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
        return env.get("PATH", SYSTEM_PATH)

    def launch(self, command: str, env: dict[str, str], log: BinaryIO) -> Container:
        ws = self.workspace
        container = _docker().containers.run(
            self.image, ["/bin/sh", "-c", command], detach=True, environment=env,
            working_dir=str(self.service_dir), user=f"{os.getuid()}:{os.getgid()}",
            volumes={str(self.src): {"bind": str(ws / "src"), "mode": "rw"},
                     str(self.home): {"bind": str(ws / "home"), "mode": "rw"},
                     str(self.attempt / "tmp"): {"bind": "/tmp", "mode": "rw"}},
            labels={"faasci.attempt": self.attempt.name},
        )  # fmt: skip
        return Container(container, log)


# A container's states once its command has ended: Podman's Docker-compatible API says
# "stopped" (not "exited") for one whose clean-up has already run.
ENDED = ("exited", "dead", "stopped")


class Container:
    """A command running in a container (see shell.Running), its output copied to the log."""

    group = None

    def __init__(self, container, log: BinaryIO):
        self.container = container
        self._started, self._ended, self._cgroup = time.monotonic(), None, None
        self._used: Usage | None = None  # the last reading of its cgroup
        self._log, self._copied = log, 0
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        with contextlib.suppress(Exception):  # the container removed meanwhile
            for chunk in self.container.logs(stream=True, follow=True):
                self._log.write(chunk)
                self._log.flush()
                self._copied += len(chunk)

    def wait(self, timeout: float) -> int | None:
        self.container.reload()
        if self.container.status in ENDED:
            self._copier.join(timeout=10)
            self._ended = self._ended or time.monotonic()
            self._copy_rest()
            return self.container.attrs["State"]["ExitCode"]
        self._measure()
        time.sleep(timeout)
        return None

    def _copy_rest(self) -> None:
        """What the live copy missed: Podman's followed log of a container that exits within
        milliseconds can end before its last output (seen in CI: a `cat`'s output lost)."""
        if self._copier.is_alive():  # still copying: it has the stream's rest
            return
        seen = 0
        with contextlib.suppress(Exception):  # read again as a stream: never whole in memory
            for chunk in self.container.logs(stream=True, follow=False):
                new = chunk[max(self._copied - seen, 0) :]
                seen += len(chunk)
                if new:
                    self._log.write(new)
                    self._copied += len(new)
            self._log.flush()

    def _measure(self) -> None:
        """Read its cgroup while it runs (the engine removes it with the container): the
        last reading stands for the command's usage (faasci.usage)."""
        if self._cgroup is None:
            pid = (self.container.attrs.get("State") or {}).get("Pid") or 0
            self._cgroup = usage_cgroup_dir(pid) if pid else None
        read = read_cgroup(self._cgroup) if self._cgroup else None
        if read is not None:
            self._used = Usage(cpu_s=read[0], peak_rss_bytes=read[1], commands=1)

    def usage(self) -> Usage | None:
        """Its cgroup's CPU seconds and peak memory at the last reading (None when none
        could be read: a command that ended before the first poll, cgroup v1)."""
        if self._used is None:
            return None
        wall = (self._ended or time.monotonic()) - self._started
        return self._used.model_copy(update={"wall_s": wall})

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.container.stop(timeout=shell.KILL_GRACE_S)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.container.remove(force=True)


@functools.cache
def _docker():
    import docker  # only stages that name an image need the engine

    return docker.from_env()
