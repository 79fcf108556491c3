"""Background processes with pid files: start once, find again, stop with their children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from ..shell import record_pid, recorded_pid


def pid_of(run_dir: Path, name: str) -> int | None:
    """The pid of a live process we started under `name`, else None (stale files removed).
    The file holds the pid and when that process started: a number reused by a process
    started since (pids wrap around) is not ours, and is never signalled."""
    pidfile = run_dir / f"{name}.pid"
    if (found := recorded_pid(pidfile)) is None:
        return None
    pid, reused = found
    if alive(pid) and not reused:
        return pid
    pidfile.unlink(missing_ok=True)
    return None


def start(
    run_dir: Path,
    name: str,
    argv: list[str],
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    record_pid(run_dir / f"{name}.pid", proc.pid)
    return proc.pid


def stop(run_dir: Path, name: str, timeout: float = 15) -> bool:
    """TERM the process group, KILL it after `timeout`; True if something was running."""
    pid = pid_of(run_dir, name)
    if pid is None:
        return False
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
    (run_dir / f"{name}.pid").unlink(missing_ok=True)
    return True


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # reap it if it is our child
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
            return f.read().split(")")[-1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def wait_until(check, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(interval)
