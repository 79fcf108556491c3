"""Running a stage's commands: each in its own process group, all within one deadline.

On a timeout the whole group is killed (TERM, then KILL after a grace period), so a test
runner's children die with it. Whatever a command leaves running in its group is killed
when it ends, as CI runners do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

KILL_GRACE_S = 5


@dataclass
class Outcome:
    exit_code: int | None  # None when a command was killed by the deadline
    timed_out: bool = False
    command: str | None = None  # the command that failed or timed out

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def run_commands(
    commands: list[str], cwd: Path, env: dict[str, str], timeout: float, log: BinaryIO
) -> Outcome:
    deadline = time.monotonic() + timeout
    for command in commands:
        log.write(f"$ {command}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            log.write(f"\n[faas-ci] timed out after {timeout:.0f}s: killed {command!r}\n".encode())
            return Outcome(exit_code=None, timed_out=True, command=command)
        finally:
            _kill_quietly(proc.pid, signal.SIGKILL)
        if code != 0:
            log.write(f"\n[faas-ci] {command!r} exited with {code}\n".encode())
            return Outcome(exit_code=code, command=command)
    return Outcome(exit_code=0)


def kill_group(proc: subprocess.Popen) -> None:
    """TERM the process group, KILL it if it is still there after the grace period."""
    _kill_quietly(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_S)
    _kill_quietly(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_quietly(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
