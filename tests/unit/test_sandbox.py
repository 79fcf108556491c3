"""faasci.sandbox with real namespaces: what a stage's command sees, and that nothing it
starts outlives it."""

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from faasci import shell
from faasci.sandbox import Overlay, Sandbox, stage_path
from faasci.settings import Settings, configure

HOSTILE = "sleep 7777"  # how these tests' strays are told apart


@pytest.fixture
def secrets_dir():
    """A platform secrets folder outside /tmp (which stages get a private one of anyway)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="faasci-secrets-") as folder:
        (Path(folder) / "s3-secret-key").write_text("do-not-leak")
        yield Path(folder)


@pytest.fixture
def box(tmp_path, secrets_dir):
    """A sandbox for one attempt, with platform secrets and a work folder of its own."""
    configure(Settings(secrets_dir=secrets_dir, workdir=tmp_path / "work",
                       cache_dir=tmp_path / "cache", workspace=tmp_path / "ws"))  # fmt: skip
    attempt = tmp_path / "work" / "run-unit-1"
    (attempt / "src").mkdir(parents=True)
    sandbox = Sandbox(attempt)
    yield sandbox
    configure(None)
    for proc in psutil.process_iter(["cmdline"]):
        if HOSTILE in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def run(box: Sandbox, *commands: str, timeout: float = 30, cancel=None):
    """(Outcome, log text) of `commands` run in `box`."""
    box.prepare()
    env = {"PATH": stage_path(box.service_dir), "HOME": str(box.workspace / "home")}
    log_path = box.attempt / "stage.log"
    with log_path.open("wb") as log:
        outcome = shell.run_commands(list(commands), box.launch, env, timeout, log, cancel)
    return outcome, log_path.read_text()


def sleepers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if HOSTILE in " ".join(p.info["cmdline"] or [])]  # fmt: skip


def test_the_command_sees_its_checkout_at_the_stable_path(box):
    (box.src / "marker").write_text("mine\n")
    outcome, log = run(box, 'pwd; cat marker; echo "home=$HOME"; touch made-here')
    assert outcome.passed, log
    assert f"{box.workspace}/src\nmine\nhome={box.workspace}/home" in log
    assert (box.src / "made-here").exists()


def test_the_platform_secrets_and_faasci_are_out_of_reach(box, secrets_dir):
    outcome, log = run(
        box,
        f'test -z "$(ls -A {secrets_dir})"',
        f"! cat {secrets_dir}/s3-secret-key",
        f"! umount {secrets_dir}",
        f"! ls {sys.prefix}/bin",
        "! python3 -c 'import faasci'",
        "python3 -c 'import sys; print(sys.path)'; echo $PATH",
    )
    assert outcome.passed, log
    assert "do-not-leak" not in log
    assert sys.prefix not in log.split("$ python3 -c 'import sys")[1]


def test_a_hidden_folder_inside_another_hidden_one_is_hidden_with_it(box, secrets_dir):
    """As on a stack, whose per-function secrets folder is inside the platform's."""
    inner = secrets_dir / "lint"
    inner.mkdir()
    (inner / "token").write_text("do-not-leak")
    configure(Settings(secrets_dir=secrets_dir, sandbox_hide=[inner], workdir=box.attempt.parent,
                       workspace=box.workspace))  # fmt: skip
    outcome, log = run(box, f'test -z "$(ls -A {secrets_dir})"', f"! cat {inner}/token")
    assert outcome.passed, log


def test_it_sees_only_its_own_processes(box):
    outcome, log = run(box, "ls /proc | grep -c '^[0-9]'")
    assert outcome.passed, log
    assert int(log.split()[-1]) < 10  # its shells and ls, not this machine's


def test_setsid_children_and_daemons_end_with_the_command(box):
    outcome, log = run(
        box,
        f"(setsid sh -c '{HOSTILE}' &); sh -c '({HOSTILE}.5 &) &'; sleep 0.2; echo started",
    )
    assert outcome.passed and "started" in log, log
    time.sleep(0.3)
    assert sleepers() == []


def test_a_cancel_ends_every_process_too(box):
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    outcome, log = run(
        box,
        f"(setsid sh -c '{HOSTILE}' &); {HOSTILE}.25",
        cancel=cancel,
    )
    assert outcome.cancelled, log
    assert time.monotonic() - started < shell.KILL_GRACE_S + 3
    time.sleep(0.3)
    assert sleepers() == []


LAUNCHER = """
import sys, time
from pathlib import Path
from faasci.sandbox import Sandbox
from faasci.settings import Settings, configure
configure(Settings(workdir=Path(sys.argv[1]) / "work", workspace=Path(sys.argv[1]) / "ws"))
box = Sandbox(Path(sys.argv[1]) / "work" / "run-unit-1")
box.src.mkdir(parents=True)
box.prepare()
box.launch(sys.argv[2], {"PATH": "/usr/bin:/bin"}, sys.stdout.buffer)
time.sleep(60)
"""


def test_the_commands_end_when_their_function_process_is_killed(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path),
                                 f"(setsid sh -c '{HOSTILE}' &); {HOSTILE}.75"])  # fmt: skip
    deadline = time.monotonic() + 10
    while len([p for p in sleepers() if p.name() == "sleep"]) < 2:
        assert time.monotonic() < deadline, "the commands did not start"
        time.sleep(0.05)
    launcher.kill()  # SIGKILL: no handler of the function's runs
    launcher.wait()
    deadline = time.monotonic() + 5
    while sleepers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleepers() == []


def test_restored_paths_are_writable_but_the_cache_is_never_changed(box, tmp_path):
    lower = tmp_path / "cache" / "entry" / ".venv"
    (lower / "bin").mkdir(parents=True)
    (lower / "bin" / "tool").write_text("cached\n")
    box.overlays = [Overlay(lower, box.src / ".venv")]
    outcome, log = run(box, "cat .venv/bin/tool", "echo changed > .venv/bin/tool",
                       "echo new > .venv/new", "cat .venv/bin/tool")  # fmt: skip
    assert outcome.passed, log
    assert "cached\n" in log and log.rstrip().endswith("changed")
    assert (lower / "bin" / "tool").read_text() == "cached\n"
    assert not (lower / "new").exists()


def test_a_sandbox_that_cannot_be_made_is_not_the_commands_failure(box, tmp_path):
    box.overlays = [Overlay(tmp_path / "missing", box.src / ".venv")]
    outcome, log = run(box, "echo never-runs")
    assert not outcome.passed
    assert box.failed()
    assert "never-runs\n" not in log.replace("$ echo never-runs\n", "")
    outcome, _ = run(box.__class__(box.attempt), "true")
    assert outcome.passed


def test_the_command_runs_as_the_callers_uid(box):
    outcome, log = run(box, "id -u")
    assert outcome.passed, log
    assert log.split()[-1] == str(os.getuid())


def test_another_attempts_files_are_hidden(box):
    other = box.attempt.parent / "run-lint-1" / "src"
    other.mkdir(parents=True)
    (other / "theirs").write_text("x")
    outcome, log = run(box, f"! ls {other}", f"! ls {Path(box.attempt.parent)}/run-lint-1")
    assert outcome.passed, log


@pytest.mark.parametrize("state", ["exited", "dead", "stopped"])
def test_a_container_whose_command_ended_is_waited_for_in_every_state_podman_reports(state):
    """Podman's API says `stopped` for a container already cleaned up: that is an end too,
    with its exit code (waiting on it would hold the stage until its timeout)."""
    from faasci.sandbox import Container

    class Ended:  # what the docker SDK's Container answers once its command is done
        status, attrs = state, {"State": {"ExitCode": 3}}

        def reload(self):
            pass

        def logs(self, stream, follow):
            return iter([b"done\n"])

    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        assert Container(Ended(), log).wait(30) == 3
        assert time.monotonic() - started < 5
        log.seek(0)
        assert log.read() == b"done\n"
