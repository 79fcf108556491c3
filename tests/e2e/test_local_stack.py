"""`faasci up` and `faasci down` on a second stack of their own: idempotent start, a
complete stop, and data (runs, logs) that outlives a restart. Also: secrets stay secret."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import PORT_OFFSET, ROOT, stack_ports

from faasci.local import processes
from faasci.local.config import LocalConfig
from faasci.local.openfaas_api import credentials

FAASCI = str(Path(sys.executable).parent / "faasci")
OTHER_STACK = stack_ports(29080, 25222, 29333)
OTHER_GATEWAY = OTHER_STACK["OPENFAAS_URL"]


@pytest.fixture
def other_stack(tmp_path):
    """Environment for a second stack in tmp_path; stopped afterwards whatever happened."""
    env = {**os.environ, **OTHER_STACK, "FAASCI_HOME": str(tmp_path / "home"),
           "FAASCI_STACK": str(ROOT / "stack.yml")}  # fmt: skip
    env.pop("FAASCI_SECRETS_DIR", None)
    yield env
    subprocess.run([FAASCI, "down"], env=env, capture_output=True, timeout=120)


def faasci(env, *args, timeout=300):
    return subprocess.run([FAASCI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def listening(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=1)
        return True
    except requests.ConnectionError:
        return False


def test_up_is_idempotent_and_down_stops_everything(other_stack, sample_repo):
    """up twice (the second says so), a run, down (every process gone), up: the run is kept."""
    first = faasci(other_stack, "up")
    assert first.returncode == 0, first.stderr
    again = faasci(other_stack, "up")
    assert again.returncode == 0 and "already up" in again.stderr

    home = Path(other_stack["FAASCI_HOME"])
    auth = credentials(home / "secrets")
    functions = requests.get(f"{OTHER_GATEWAY}/system/functions", auth=auth, timeout=5).json()
    pids = [processes.pid_of(home / "run", n) for n in ("gateway", "s3", "nats", "vault")]
    pids += [f["pid"] for f in functions]
    assert all(pids) and len(pids) == 4 + len(functions)
    webhook_secret = faasci(other_stack, "secrets", "show-webhook").stdout.strip()
    assert len(webhook_secret) >= 32

    run = json.loads(faasci(other_stack, "run", str(sample_repo), "--json").stdout)
    assert run["status"] == "passed"

    down = faasci(other_stack, "down")
    assert down.returncode == 0 and "gateway" in down.stderr
    survivors = [pid for pid in pids if processes.alive(pid)]
    assert survivors == [], "processes survived faasci down"
    assert not any(listening(p + PORT_OFFSET) for p in (29080, 29081, 29333, 25222 + 4000, 29200))
    assert faasci(other_stack, "down").stderr.strip() == "faas-ci was not running"

    assert faasci(other_stack, "up").returncode == 0
    # OpenBao is no dev server: its secrets outlive down and up (unsealed again by up).
    assert faasci(other_stack, "secrets", "show-webhook").stdout.strip() == webhook_secret
    shown = json.loads(faasci(other_stack, "show", run["id"], "--json").stdout)
    assert shown == run
    logs = faasci(other_stack, "logs", run["id"], "unit")
    assert logs.returncode == 0 and "passed" in logs.stdout


def test_secrets_reach_neither_logs_nor_commands(stack, gateway, make_repo):
    """A stage's commands see no secret, and no log of the stack holds a secret's value."""
    repo = make_repo({".faasci.yml": "service: envdump\nstages:\n  lint:\n    run: [env]\n"})
    result = gateway.call("lint", {"repo": str(repo)}).json()
    assert result["status"] == "passed"
    command_env = gateway.call("pipeline-log", method="GET",
                               path=f"{result['run_id']}/lint/1").text  # fmt: skip
    assert "FAASCI_RUN_ID=" in command_env and "CI=true" in command_env
    assert "FAASCI_SECRETS_DIR" not in command_env and "NATS_URL" not in command_env
    secrets = [
        v
        for p in stack.secrets_dir.iterdir()
        if p.name != "basic-auth-user" and (v := p.read_text().strip())
    ]  # a name: admin
    assert len(secrets) >= 3
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("*.log"))
    for value in secrets:
        assert value not in command_env
        assert value not in logs


def test_cli_invoke_prints_the_answer(stack):
    """`faasci invoke` prints a function's JSON answer and exits by its status."""
    env = {**os.environ, **stack.env()}
    done = faasci(env, "invoke", "runs", "")
    assert done.returncode == 1 and "body" in json.loads(done.stdout)["field"]
    done = faasci(env, "invoke", "no-such-function", "{}")
    assert done.returncode == 1 and "not found" in done.stdout


def test_config_reads_the_stack_gateway(monkeypatch):
    """Without OPENFAAS_URL the gateway is stack.yml's provider.gateway."""
    monkeypatch.delenv("OPENFAAS_URL", raising=False)
    assert LocalConfig.from_env(ROOT / "stack.yml").gateway_url == "http://127.0.0.1:8080"


def test_a_killed_function_is_restarted(gateway):
    """SIGKILL of a function's process: the provider starts a new one that serves again."""
    import signal
    import time

    def pipeline_log():
        listed = gateway.session.get(f"{gateway.url}/system/functions").json()
        return next(f for f in listed if f["name"] == "pipeline-log")

    before = pipeline_log()
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        now = pipeline_log()
        if now["pid"] != before["pid"] and now["availableReplicas"] == 1:
            break
        assert time.monotonic() < deadline, "pipeline-log was not restarted"
        time.sleep(0.2)
    assert now["restarts"] == before["restarts"] + 1
    resp = gateway.call("pipeline-log", method="GET", path="20260101-000000-abcdef/unit/1")
    assert resp.status_code == 404 and resp.json()["error"].startswith("no object")


def test_a_run_survives_a_restart_of_the_whole_stack(other_stack, make_repo, outside):
    """faasci down in the middle of a stage, then up: the stage finishes within its drain
    (its hand-off reaches the draining gateway's queue), the queued work and the run record
    survive, and the run finishes with the stage's commands completed once."""
    starts, marker = outside / "starts", outside / "marker"
    repo = make_repo({".faasci.yml": f"""\
service: restart
stages:
  unit:
    run: ["echo start >> {starts}; sleep 5; echo done >> {marker}"]
    backoff: {{initial_s: 0.5}}
  build:
    run: ["true"]
"""})  # fmt: skip
    assert faasci(other_stack, "up").returncode == 0
    started = faasci(other_stack, "run", str(repo), "--detach", "--json")
    run_id = json.loads(started.stdout)["id"]
    deadline = time.monotonic() + 60
    while not starts.exists():
        assert time.monotonic() < deadline, "the unit stage did not start"
        time.sleep(0.2)
    assert faasci(other_stack, "down").returncode == 0
    assert faasci(other_stack, "up").returncode == 0
    other = make_repo({".faasci.yml": 'service: other\nstages:\n  lint: {run: ["true"]}\n'})
    assert faasci(other_stack, "run", str(other)).returncode == 0  # new work runs meanwhile
    deadline = time.monotonic() + 180
    while (run := json.loads(faasci(other_stack, "show", run_id, "--json").stdout))[
        "status"
    ] not in ("passed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"run still {run['status']}"
        time.sleep(1)
    assert run["status"] == "passed"
    assert marker.read_text().splitlines() == ["done"]
    assert [[a["status"] for a in stage["attempts"]] for stage in run["stages"]] == [
        ["passed"],
        ["passed"],
    ]
