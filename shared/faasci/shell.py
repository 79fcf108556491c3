"""Running a stage's commands: each in its own process group, all within one deadline.

On a timeout or a cancel the whole group is killed (TERM, then KILL after a grace
period), so a test runner's children die with it. Whatever a command leaves running in
its group is killed when it ends, as CI runners do. The running group's id is written to
`pgid_file`, so whoever outlives this process (the local provider, when a function
process dies) can kill the group too, as a container's death would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

KILL_GRACE_S = 5
POLL_S = 0.2


@dataclass
class Outcome:
    exit_code: int | None  # None when a command was killed (deadline or cancel)
    timed_out: bool = False
    cancelled: bool = False
    command: str | None = None  # the command that failed, timed out or was cancelled

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.cancelled)


def run_commands(commands: list[str], cwd: Path, env: dict[str, str], timeout: float,
                 log: BinaryIO, cancel: threading.Event | None = None,
                 pgid_file: Path | None = None) -> Outcome:  # fmt: skip
    cancel = cancel or threading.Event()
    deadline = time.monotonic() + timeout
    for command in commands:
        log.write(f"$ {command}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        if pgid_file:
            pgid_file.write_text(str(proc.pid))
        try:
            code = _wait(proc, deadline, cancel)
        finally:
            kill_group(proc.pid, signal.SIGKILL)
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


def _wait(proc: subprocess.Popen, deadline: float, cancel: threading.Event) -> int | str:
    """The exit code, or "timeout"/"cancelled" after killing the group."""
    while True:
        try:
            return proc.wait(timeout=max(min(POLL_S, deadline - time.monotonic()), 0))
        except subprocess.TimeoutExpired:
            pass
        if cancel.is_set() or time.monotonic() >= deadline:
            stop_group(proc)
            return "cancelled" if cancel.is_set() else "timeout"


def stop_group(proc: subprocess.Popen) -> None:
    """TERM the process group, KILL it if it is still there after the grace period."""
    kill_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
