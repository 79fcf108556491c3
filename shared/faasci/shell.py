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

KILL_GRACE_S = 5
POLL_S = 0.2
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


Launch = Callable[[str, dict[str, str], BinaryIO], Running]


class Process:
    """A command's process group (the process is its session's leader)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.group = proc, proc.pid

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """TERM every process of the command, KILL the group if it is still there after
        the grace period. A sandbox's `unshare` is spared the TERM: its death would SIGKILL
        the rest at once, with no time to clean up."""
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(self.proc.pid)
            for member in [leader, *leader.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    if member.name() != "unshare":
                        member.terminate()
        self.wait(KILL_GRACE_S)
        self.kill()
        self.proc.wait()

    def kill(self) -> None:
        kill_group(self.proc.pid, signal.SIGKILL)


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
            pgid_file.write_text(str(running.group))
        try:
            code = _wait(running, deadline, cancel)
        finally:
            running.kill()
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


def _wait(running: Running, deadline: float, cancel: threading.Event) -> int | str:
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
