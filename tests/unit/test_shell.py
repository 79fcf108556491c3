"""faasci.shell.run_commands with real processes: order, failures, deadlines, process groups."""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from faasci import shell

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


def alive(pid: int) -> bool:
    """True while `pid` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def run(tmp_path):
    """run(commands, timeout) → (Outcome, log text), in tmp_path; strays killed after."""
    log_path = tmp_path / "stage.log"
    work = tmp_path / "work"
    work.mkdir()

    def call(commands, timeout=30.0, env=ENV):
        with log_path.open("wb") as log:
            outcome = shell.run_commands(commands, shell.plain(work), env, timeout, log)
        return outcome, log_path.read_text()

    call.work = work
    yield call
    kill_strays(work)


def kill_strays(work: Path) -> None:
    """Kill whatever still runs in `work`, so a failing test leaves no sleep behind."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = Path(os.readlink(proc / "cwd"))
            if cwd == work or work in cwd.parents:
                os.kill(int(proc.name), signal.SIGKILL)


def read_pid(path: Path) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def test_commands_run_in_order_in_cwd_with_env(run):
    """All commands run, in order, in the given folder, with exactly the given environment."""
    outcome, log = run(
        ["echo first > order.txt", "echo second >> order.txt", 'echo "[$FAASCI_TEST_VAR][$HOME]"'],
        env={**ENV, "FAASCI_TEST_VAR": "from-env"},
    )
    assert outcome.passed
    assert (outcome.exit_code, outcome.timed_out, outcome.command) == (0, False, None)
    assert (run.work / "order.txt").read_text() == "first\nsecond\n"
    assert "\n[from-env][]\n" in log  # HOME is not inherited from this process


def test_output_goes_to_the_log_with_each_command(run):
    """Each command is echoed as `$ command`, followed by its stdout and stderr."""
    outcome, log = run(["echo out-line", "echo err-line >&2"])
    assert outcome.passed
    assert log == "$ echo out-line\nout-line\n$ echo err-line >&2\nerr-line\n"


def test_stops_at_the_first_failure_with_its_exit_code(run):
    """A failing command ends the stage with its exit code; later commands never run."""
    outcome, log = run(["echo one", "exit 3", "touch third-ran"])
    assert not outcome.passed
    assert outcome.exit_code == 3
    assert outcome.timed_out is False
    assert outcome.command == "exit 3"
    assert not (run.work / "third-ran").exists()
    assert log.startswith("$ echo one\none\n$ exit 3\n")
    assert "'exit 3' exited with 3" in log
    assert "touch third-ran" not in log


def test_a_missing_program_fails_with_127(run):
    """A command that does not exist fails with the shell's 127."""
    outcome, _ = run(["definitely-not-a-program-faasci"])
    assert outcome.exit_code == 127
    assert not outcome.passed


def test_timeout_kills_the_whole_process_group(run):
    """On the deadline the shell and its background child are both killed."""
    started = time.monotonic()
    outcome, log = run(["sleep 300 & echo $! > child.pid; wait"], timeout=1)
    elapsed = time.monotonic() - started
    child = read_pid(run.work / "child.pid")
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert not outcome.passed
    assert outcome.command == "sleep 300 & echo $! > child.pid; wait"
    assert elapsed < 1 + shell.KILL_GRACE_S
    assert gone_within(child, 2), f"background child {child} survived the timeout"
    assert "[faas-ci] timed out after 1s" in log


def test_timeout_kills_a_child_that_ignores_sigterm(run):
    """A child that ignores TERM is KILLed with its group."""
    outcome, _ = run(
        ["sh -c 'trap \"\" TERM; echo $$ > stubborn.pid; sleep 300' & wait"], timeout=1
    )
    stubborn = read_pid(run.work / "stubborn.pid")
    assert outcome.timed_out
    assert gone_within(stubborn, 2), f"TERM-ignoring child {stubborn} survived"


def test_the_deadline_covers_all_commands_together(run):
    """The timeout is for the whole stage: two 0.8 s commands do not fit in 1 s."""
    outcome, _ = run(["sleep 0.8", "sleep 0.8", "touch after"], timeout=1)
    assert outcome.timed_out
    assert outcome.command == "sleep 0.8"
    assert not (run.work / "after").exists()


def test_a_background_process_left_by_a_passing_command_is_killed(run):
    """A command that exits 0 leaving a daemon behind has the daemon killed too."""
    outcome, _ = run(["sleep 300 > /dev/null 2>&1 & echo $! > leftover.pid", "true"])
    leftover = read_pid(run.work / "leftover.pid")
    assert outcome.passed
    assert gone_within(leftover, 2), f"leftover process {leftover} is still running"


def test_a_background_process_left_by_a_failing_command_is_killed(run):
    """A command that fails leaving a process behind has it killed as well."""
    outcome, _ = run(["sleep 300 > /dev/null 2>&1 & echo $! > leftover.pid; exit 5"])
    leftover = read_pid(run.work / "leftover.pid")
    assert outcome.exit_code == 5
    assert gone_within(leftover, 2), f"leftover process {leftover} is still running"


def test_timeout_message_comes_after_the_command_output(run):
    """The log keeps the command's own output before the timeout note."""
    _, log = run(["echo before-timeout; sleep 300"], timeout=0.5)
    assert log.index("before-timeout\n") < log.index("[faas-ci] timed out")


def test_a_recorded_group_is_killed_even_after_its_leader_is_gone(tmp_path):
    """kill_recorded kills a group it recorded, its leader alive or already dead (what a
    dead function leaves: the commands' children still running in the group)."""
    import subprocess

    for leader_exits in (False, True):
        script = "sleep 300 & echo $! > child.pid; " + ("exit 0" if leader_exits else "wait")
        leader = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, start_new_session=True)
        child = read_pid(tmp_path / "child.pid")
        shell.record_pid(tmp_path / "pgid", leader.pid)
        if leader_exits:
            leader.wait()
        try:
            assert shell.kill_recorded(tmp_path / "pgid") == leader.pid
            assert gone_within(child, 2)
        finally:
            kill_strays(tmp_path)
            leader.wait()
        (tmp_path / "child.pid").unlink()


def test_a_recorded_group_whose_number_was_reused_is_left_alone(tmp_path):
    """A stale record whose group number now leads a process started since (pids wrap
    around) kills nothing."""
    import subprocess

    newer = subprocess.Popen(["sleep", "300"], cwd=tmp_path, start_new_session=True)
    try:
        shell.record_pid(tmp_path / "pgid", newer.pid)
        recorded = (tmp_path / "pgid").read_text().split()
        # as if the number had led an older group, started one tick before
        (tmp_path / "pgid").write_text(f"{recorded[0]} {int(recorded[1]) - 1}")
        assert shell.kill_recorded(tmp_path / "pgid") is None
        assert not gone_within(newer.pid, 0.3)
    finally:
        newer.kill()
        newer.wait()
