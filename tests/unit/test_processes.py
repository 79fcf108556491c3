"""The local stack's background processes, found again by their pid files."""

import os
import signal

from faasci.local import processes


def test_a_pid_file_whose_number_was_reused_is_stale(tmp_path):
    """A pid file names its process with its start time: once the number belongs to a
    process started since (pids wrap around), it is stale, and stop signals nothing."""
    env = {"PATH": os.environ["PATH"]}
    pid = processes.start(tmp_path, "sleeper", ["sleep", "300"], tmp_path / "log", env)
    try:
        assert processes.pid_of(tmp_path, "sleeper") == pid
        number, started = (tmp_path / "sleeper.pid").read_text().split()
        (tmp_path / "sleeper.pid").write_text(f"{number} {int(started) - 1}")  # an older one
        assert processes.pid_of(tmp_path, "sleeper") is None
        assert not (tmp_path / "sleeper.pid").exists()
        assert processes.stop(tmp_path, "sleeper") is False
        assert processes.alive(pid)
        (tmp_path / "sleeper.pid").write_text(str(pid))  # as older versions wrote it
        assert processes.stop(tmp_path, "sleeper", timeout=5) is True
        assert not processes.alive(pid)
    finally:
        processes.signal_group(pid, signal.SIGKILL)
