"""What a stage attempt's processes used, from the kernel's own accounting.

A command run as a process (faasci.shell.Process, a sandbox's `unshare`) is reaped with
`wait4`, whose rusage covers it and every descendant it waited for: user + system CPU and
the largest resident set among them (ru_maxrss, KiB on Linux). Linux counts in ru_maxrss
what the first process inherited by its fork (the function's own resident set): when the
figure is not above that, the tree's high-water marks (VmHWM) read while it ran stand in.
A command run in a container (faasci.sandbox.Container) is read from its cgroup while it
runs (v2: cpu.stat, memory.peak; v1: cpuacct.usage, memory.max_usage_in_bytes).

`metered()` collects the usage of every command started in its block (in this thread: a
stage runs its commands in the thread that executes it); faasci.stage records the sum on
the attempt (runs.Attempt.usage).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from pydantic import BaseModel


class Usage(BaseModel):
    """Resources used: CPU seconds (user + system), the peak resident memory of the largest
    process (bytes) and wall time (seconds) of the commands."""

    cpu_s: float = 0.0
    peak_rss_bytes: int = 0
    wall_s: float = 0.0
    commands: int = 0  # how many were accounted for

    def add(self, other: Usage) -> Usage:
        """Sums CPU and wall time; the peak is the larger one (commands run one after another)."""
        return Usage(
            cpu_s=self.cpu_s + other.cpu_s,
            peak_rss_bytes=max(self.peak_rss_bytes, other.peak_rss_bytes),
            wall_s=self.wall_s + other.wall_s,
            commands=self.commands + other.commands,
        )

    def rounded(self) -> Usage:
        return self.model_copy(update={"cpu_s": round(self.cpu_s, 6),
                                       "wall_s": round(self.wall_s, 6)})  # fmt: skip


INHERITED_SLACK = 8 * 2**20


def from_rusage(rusage, wall_s: float, inherited: int = 0, sampled_peak: int = 0) -> Usage:
    """One reaped process tree (os.wait4's resource.struct_rusage). Its ru_maxrss counts
    what the command's first process inherited when it was forked (Linux keeps the
    pre-exec high-water mark): a peak not above `inherited` (the launcher's resident set)
    may be only that, so the tree's own high-water marks seen while it ran
    (`sampled_peak`: tree_hwm) stand for it then."""
    peak = rusage.ru_maxrss * 1024
    # A margin: the launcher's resident set moves a little between the fork and its reading.
    own = peak > inherited * 1.05 + INHERITED_SLACK
    return Usage(cpu_s=rusage.ru_utime + rusage.ru_stime,
                 peak_rss_bytes=max(sampled_peak, peak if own else 0),
                 wall_s=wall_s, commands=1)  # fmt: skip


def hwm(pid: int | str = "self") -> int:
    """A process's resident high-water mark (VmHWM), bytes; 0 when it is gone."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def own_rss() -> int:
    """This process's resident high-water mark, bytes: a child forked now starts its own
    ru_maxrss from it (the fork copies the memory descriptor, its peak with it)."""
    return hwm()


def tree_hwm(pid: int) -> int:
    """The largest resident high-water mark (VmHWM, since its exec) among a live process
    and its descendants, bytes; 0 when it is gone. The tree is found in one pass over
    /proc/<pid>/stat (no process objects: it runs beside every command)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (parent := _parent(entry.name)) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(member := todo.pop())
        todo += children.get(member, ())
    return max(hwm(member) for member in tree)


def _parent(pid: str) -> int | None:
    """A process's parent pid from /proc/<pid>/stat ("pid (comm) state ppid ...", the
    command name may hold spaces and parentheses); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


class Meter:
    """The usage summed over the commands of one block."""

    def __init__(self) -> None:
        self.total = Usage()

    def add(self, used: Usage | None) -> None:
        if used is not None:
            self.total = self.total.add(used)


_current: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("meter", default=None)


@contextlib.contextmanager
def metered() -> Iterator[Meter]:
    """Collect the usage of the commands run in this block (nested blocks each see theirs,
    and the outer one too)."""
    outer, meter = _current.get(), Meter()
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)
        if outer is not None:
            outer.add(meter.total)


def record(used: Usage | None) -> None:
    """Called by faasci.shell for each command that ended: counted in the current meter."""
    meter = _current.get()
    if meter is not None:
        meter.add(used)


# Containers: their cgroup while they run (the engine removes it when they end). cgroup v2:
# one folder with cpu.stat and memory.peak; v1: the cpuacct and memory hierarchies apart.

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_dir(pid: int, root: str = CGROUP_ROOT) -> dict[str, str] | None:
    """Where a process's CPU and memory are accounted: {"cpu": folder, "memory": folder,
    "version": "1" or "2"}; None when it has no cgroup we can read."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    v1 = {}
    for _, controllers, path in (line for line in lines if len(line) == 3):
        for name in controllers.split(","):
            if name in ("cpuacct", "memory"):
                v1[name] = path
    if "cpuacct" in v1 and "memory" in v1:
        cpu = next((f"{root}/{d}{v1['cpuacct']}" for d in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu")
                    if os.path.isdir(f"{root}/{d}{v1['cpuacct']}")), None)  # fmt: skip
        memory = f"{root}/memory{v1['memory']}"
        if cpu and os.path.isdir(memory):
            return {"cpu": cpu, "memory": memory, "version": "1"}
    unified = next((path for hid, controllers, path in (x for x in lines if len(x) == 3)
                    if hid == "0" and controllers == ""), None)  # fmt: skip
    if unified is not None:
        for base in (root, f"{root}/unified"):
            if os.path.isfile(f"{base}{unified}/cpu.stat"):
                folder = f"{base}{unified}"
                return {"cpu": folder, "memory": folder, "version": "2"}
    return None


def read_cgroup(where: dict[str, str]) -> tuple[float, int] | None:
    """(CPU seconds, peak memory bytes) of a cgroup (cgroup_dir's answer), None when gone."""
    try:
        if where["version"] == "1":
            cpu = int(_read(f"{where['cpu']}/cpuacct.usage")) / 1e9  # nanoseconds
            return cpu, int(_read(f"{where['memory']}/memory.max_usage_in_bytes"))
        stat = _read(f"{where['cpu']}/cpu.stat").splitlines()
        usec = next(int(line.split()[1]) for line in stat if line.startswith("usage_usec"))
        peak = 0
        for name in ("memory.peak", "memory.current"):  # memory.peak: Linux 5.19 on
            with contextlib.suppress(OSError):
                peak = int(_read(f"{where['memory']}/{name}"))
                break
        return usec / 1e6, peak
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
