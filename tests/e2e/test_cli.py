"""The `faasci` command as people use it, from a folder outside the checkout, at 80 columns:
progress and the reason of a failure, whole run ids, `--version`, Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
from conftest import FAASCI

RUN_ID = re.compile(r"run (\d{8}-\d{6}-[0-9a-f]{6})")
# What points a process at the test stack: the CLI must find it from its user config instead.
STACK_VARIABLES = ("FAASCI_STACK", "FAASCI_HOME", "OPENFAAS_URL", "FAASCI_NATS_PORT",
                   "FAASCI_S3_PORT", "FAASCI_SECRETS_DIR", "FAASCI_CONTAINERS",
                   "FAASCI_OIDC_PORT", "FAASCI_VAULT_PORT")  # fmt: skip


@pytest.fixture
def cli(stack, tmp_path, outside):
    """Run `faasci` in a folder outside the checkout, at 80 columns, knowing the test stack
    only from a user config file, as `faasci up` writes it."""
    from faasci import userconfig

    config = userconfig.remember_stack(stack, tmp_path / "config.json")
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
    env.update(FAASCI_CONFIG=str(config), COLUMNS="80", TERM="dumb")
    env.pop("FAASCI_TOKEN", None)
    home = outside / "elsewhere"
    home.mkdir()

    def run(*args, timeout=180, **kw):
        return subprocess.run([FAASCI, *args], env=env, cwd=home, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **kw)  # fmt: skip

    run.env, run.cwd = env, home
    return run


def pipeline(make_repo, stages: str):
    return make_repo({".faasci.yml": f"service: cli-test\nstages:\n{stages}"})


def run_id_of(output: str) -> str:
    found = RUN_ID.search(output)
    assert found, output
    return found.group(1)


def test_version():
    done = subprocess.run([FAASCI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert re.fullmatch(r"faasci \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout


def test_run_and_runs_from_anywhere_fit_80_columns(cli, make_repo):
    repo = pipeline(make_repo, '  lint:\n    run: ["sleep 2", "echo fine"]\n')
    done = cli("run", str(repo))
    assert done.returncode == 0, done.stderr
    run_id = run_id_of(done.stderr)
    # without --follow, off a terminal: a plain line per change, with the elapsed times
    assert re.search(r"\]\s+lint running", done.stderr), done.stderr
    assert re.search(r"\]\s+lint passed in \d", done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    listed = cli("runs", "--limit", "50")
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout  # whole, on one line
    assert max(len(line) for line in listed.stdout.splitlines()) <= 80, listed.stdout
    shown = cli("show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert run_id in shown.stdout
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80, shown.stdout


def test_a_failed_run_says_why_and_how_to_see_more(cli, make_repo):
    repo = pipeline(make_repo, '  lint:\n    run: ["echo first-line; echo the-real-error >&2;'
                    ' exit 3"]\n    retries: 0\n')  # fmt: skip
    done = cli("run", str(repo))
    assert done.returncode == 1, done.stderr
    run_id = run_id_of(done.stderr)
    assert "stage lint failed: exited with code 3" in done.stderr, done.stderr
    assert "the-real-error" in done.stderr  # the error tail
    assert f"faasci logs {run_id} lint" in done.stderr
    assert "Traceback" not in done.stderr
    logs = cli("logs", run_id, "lint")
    assert "the-real-error" in logs.stdout


def test_a_timed_out_stage_says_so(cli, make_repo):
    repo = pipeline(make_repo, '  lint:\n    run: ["echo waiting; sleep 30"]\n'
                    "    timeout: 2\n    retries: 0\n")  # fmt: skip
    done = cli("run", str(repo))
    assert done.returncode == 1, done.stderr
    run_id = run_id_of(done.stderr)
    assert "stage lint failed: timed out after 2s" in done.stderr, done.stderr
    assert "waiting" in done.stderr
    assert f"faasci logs {run_id} lint" in done.stderr


def test_ctrl_c_detaches_cleanly_off_a_terminal(cli, make_repo):
    repo = pipeline(make_repo, '  lint:\n    run: ["sleep 60"]\n    retries: 0\n')
    errors = cli.cwd / "stderr"
    with errors.open("w") as out:
        proc = subprocess.Popen([FAASCI, "run", str(repo)], env=cli.env, cwd=cli.cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=out,
                                text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not re.search(r"lint running", errors.read_text()):
                assert proc.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, errors.read_text()
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
        finally:
            proc.kill()
            proc.wait()
    said = errors.read_text()
    run_id = run_id_of(said)
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said
    assert "detached" in said
    assert f"faasci show {run_id} --follow" in said
    assert f"faasci cancel {run_id}" in said
    run = json.loads(cli("show", run_id, "--json").stdout)
    assert run["status"] == "running"  # left running, as said
    assert cli("cancel", run_id).returncode == 0
