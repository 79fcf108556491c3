"""Running a stage's commands: each in its own process group, all within one deadline.

`launch` starts one command (a stage's: in its sandbox, see faasci.sandbox; `plain`: a
shell in a folder). On a timeout or a cancel every process of the command is asked to
stop (TERM), then the group is killed after a grace period, so a test runner's children
die with it. Whatever a command leaves running in its group is killed when it ends, as
CI runners do. The running group's id is written to `pgid_file`, so whoever outlives
this process (the local provider, when a function process dies) can kill the group too,
as a container's death would.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import psutil

from . import tracing
from .usage import Usage, from_rusage, own_rss, tree_hwm
from .usage import record as record_usage

KILL_GRACE_S = 5
POLL_S = 0.2
# A running command's memory high-water marks are read after SAMPLE_S, then ever less often
# up to every SAMPLE_MAX_S (a high-water mark stays; a reading costs ~1 ms of CPU).
SAMPLE_S = 0.05
SAMPLE_MAX_S = 1.0
PR_SET_PDEATHSIG = 1


@dataclass
class Outcome:
    exit_code: int | None  # None when a command was killed (deadline or cancel)
    timed_out: bool = False
    cancelled: bool = False
    command: str | None = None  # the command that failed, timed out or was cancelled

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.cancelled)


def die_with_parent(sig: int = signal.SIGKILL):
    """A `preexec_fn` making the child get `sig` when its parent dies, even by SIGKILL
    (Linux's parent-death signal). Linux counts the *thread* that forked as the parent:
    start such children from threads that live as long as the process (the main thread,
    a supervisor, a server's worker pool). If the parent died before the signal was set,
    the child ends at once."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


class Running(Protocol):
    """A started command: a process group, or a container."""

    group: int | None  # the process group to kill if this process dies first

    def wait(self, timeout: float) -> int | None: ...  # its exit code; None while it runs

    def stop(self) -> None: ...  # TERM, then KILL after the grace period

    def kill(self) -> None: ...  # whatever is left of it, at once

    def usage(self) -> Usage | None: ...  # what it used (faasci.usage), once it ended


Launch = Callable[[str, dict[str, str], BinaryIO], Running]


class Process:
    """A command's process group (the process is its session's leader)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.group = proc, proc.pid
        self._started, self._used, self._at_stop = time.monotonic(), None, None
        # What its first process inherited by the fork, and the tree's high-water marks
        # seen while it runs (usage.from_rusage), read from SAMPLE_S on.
        self._inherited, self._hwm = own_rss(), 0
        self._sampled_at, self._sample_every = time.monotonic(), SAMPLE_S

    def wait(self, timeout: float) -> int | None:
        """Reaped with wait4 (as Popen.wait polls, backing off to 50 ms): its rusage is the
        command's and every descendant's it waited for (faasci.usage)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        deadline, delay = time.monotonic() + timeout, 0.0005
        while True:
            try:
                pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: as Popen, its code is unknown
                self.proc.returncode = 0
                return 0
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self._used = from_rusage(rusage, time.monotonic() - self._started,
                                         self._inherited, self._hwm)  # fmt: skip
                if self._at_stop is not None:  # see stop
                    self._used = self._used.model_copy(update={
                        "cpu_s": max(self._used.cpu_s, self._at_stop.cpu_s),
                        "peak_rss_bytes": max(self._used.peak_rss_bytes,
                                              self._at_stop.peak_rss_bytes)})  # fmt: skip
                return self.proc.returncode
            now = time.monotonic()
            if now - self._sampled_at >= self._sample_every:
                self._hwm, self._sampled_at = max(self._hwm, tree_hwm(self.proc.pid)), now
                self._sample_every = min(self._sample_every * 2, SAMPLE_MAX_S)
            remaining = deadline - now
            if remaining <= 0:
                return None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)

    def usage(self) -> Usage | None:
        """What it used, once reaped."""
        return self._used

    def stop(self) -> None:
        """TERM every process of the command, KILL the group if it is still there after
        the grace period. A sandbox's `unshare` is spared the TERM: its death would SIGKILL
        the rest at once, with no time to clean up."""
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(self.proc.pid)
            members = leader.children(recursive=True)
            # What the tree used so far: once killed, its processes may be reaped by no one
            # who reports to the leader, whose rusage then falls short of this.
            self._at_stop = sampled([leader, *members])
            for member in [leader, *members]:
                with contextlib.suppress(psutil.Error):
                    if member.name() != "unshare":
                        member.terminate()
        self.wait(KILL_GRACE_S)
        self.kill()
        while self.wait(KILL_GRACE_S) is None:  # reaped here, so its usage is counted
            pass

    def kill(self) -> None:
        kill_group(self.proc.pid, signal.SIGKILL)


def sampled(processes: list[psutil.Process]) -> Usage:
    """What live processes used so far: CPU, theirs and their reaped children's; the largest
    resident set."""
    cpu, peak = 0.0, 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
            peak = max(peak, p.memory_info().rss)
    return Usage(cpu_s=cpu, peak_rss_bytes=peak)


def plain(cwd: Path) -> Launch:
    """Commands run by /bin/sh in `cwd`, each the leader of a new session."""

    def launch(command: str, env: dict[str, str], log: BinaryIO) -> Process:
        return Process(subprocess.Popen(
            ["/bin/sh", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip

    return launch


def run_commands(commands: list[str], launch: Launch, env: dict[str, str], timeout: float,
                 log: BinaryIO, cancel: threading.Event | None = None,
                 pgid_file: Path | None = None) -> Outcome:  # fmt: skip
    cancel = cancel or threading.Event()
    deadline = time.monotonic() + timeout
    for command in commands:
        log.write(f"$ {command}\n".encode())
        log.flush()
        running = launch(command, env, log)
        if pgid_file and running.group:
            record_pid(pgid_file, running.group)
        try:
            with tracing.command_span(command):  # a child of the attempt's span
                code = wait(running, deadline, cancel)
        finally:
            running.kill()
            record_usage(running.usage())  # counted on the attempt (faasci.usage.metered)
            if pgid_file:
                pgid_file.unlink(missing_ok=True)
        if code == "timeout":
            log.write(f"\n[faas-ci] timed out after {timeout:.0f}s: killed {command!r}\n".encode())
            return Outcome(exit_code=None, timed_out=True, command=command)
        if code == "cancelled":
            log.write(f"\n[faas-ci] cancelled: killed {command!r}\n".encode())
            return Outcome(exit_code=None, cancelled=True, command=command)
        if code != 0:
            log.write(f"\n[faas-ci] {command!r} exited with {code}\n".encode())
            return Outcome(exit_code=code, command=command)
    return Outcome(exit_code=0)


def wait(running: Running, deadline: float, cancel: threading.Event) -> int | str:
    """The exit code, or "timeout"/"cancelled" after stopping the command."""
    while True:
        code = running.wait(timeout=max(min(POLL_S, deadline - time.monotonic()), 0))
        if code is not None:
            return code
        if cancel.is_set() or time.monotonic() >= deadline:
            running.stop()
            return "cancelled" if cancel.is_set() else "timeout"


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def started_at(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def record_pid(path: Path, pid: int) -> None:
    """Write `pid` to `path` with its start time, so a reader can tell it from a later
    process that got the same number (pids wrap around: 32768 by default, a few minutes
    of stages)."""
    path.write_text(f"{pid} {started_at(pid) or ''}".strip())


def recorded_pid(path: Path) -> tuple[int, bool] | None:
    """The pid `record_pid` wrote to `path` (or a bare pid, as older files hold) and whether
    that number now belongs to a process started since; None when unreadable."""
    try:
        pid_text, _, started = path.read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    now = started_at(pid)
    return pid, bool(started.strip()) and now is not None and now != started.strip()


def kill_recorded(pgid_file: Path) -> int | None:
    """Kill the group `pgid_file` names (record_pid), unless its number now leads another
    group. While any process of the group lives, the kernel gives its number to no one, so
    a leader gone means the rest are ours. The group's number, or None when the file is
    unreadable or names another."""
    found = recorded_pid(pgid_file)
    if found is None or found[1]:
        return None
    kill_group(found[0])
    return found[0]
