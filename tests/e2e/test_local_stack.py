"""`faasci up` and `faasci down` on a second stack of their own: idempotent start, a
complete stop, and data (runs, logs) that outlives a restart. Also: secrets stay secret."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import FAASCI, PORT_OFFSET, ROOT, stack_ports, stopped

from faasci.local import processes
from faasci.local.config import LocalConfig
from faasci.local.openfaas_api import credentials

OTHER_STACK = stack_ports(29080, 25222, 29333)
OTHER_GATEWAY = OTHER_STACK["OPENFAAS_URL"]


@pytest.fixture
def other_stack(tmp_path):
    """Environment for a second stack in tmp_path; stopped afterwards whatever happened."""
    env = {**os.environ, **OTHER_STACK, "FAASCI_HOME": str(tmp_path / "home"),
           "FAASCI_STACK": str(ROOT / "stack.yml")}  # fmt: skip
    env.pop("FAASCI_SECRETS_DIR", None)
    yield env
    stopped(env)


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

    # On a branch no environment takes: the example's CI half (its image built, scanned and
    # tested) runs on this second stack, and nothing is deployed. A deployment's container
    # on a second stack was created but never started in CI, for reasons not found yet;
    # deploying is tested on the session's stack (test_deploy_openfaas, the example's).
    subprocess.run(["git", "-C", str(sample_repo), "checkout", "--quiet", "-b", "up-down"],
                   check=True)  # fmt: skip
    run = json.loads(faasci(other_stack, "run", str(sample_repo), "--json").stdout)
    assert run["status"] == "passed", json.dumps(run["stages"], indent=1)[:4000]
    assert run["image"] and run["stages"][-1]["attempts"][0]["deployment"] is None

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
    assert resp.status_code == 404 and resp.json()["error"].startswith("no log of unit attempt 1")


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
    assert run["status"] == "passed", json.dumps(run["stages"], indent=1)[:4000]
    assert marker.read_text().splitlines() == ["done"]
    assert [[a["status"] for a in stage["attempts"]] for stage in run["stages"]] == [
        ["passed"],
        ["passed"],
    ]


def function_processes(home: Path) -> set[int]:
    """Pids of the processes running one of this stack's functions (their working folder is
    a build context of the stack's)."""
    import psutil

    root = os.path.realpath(home / "run" / "functions") + os.sep
    found = set()
    for proc in psutil.process_iter(["cwd"]):
        if (cwd := proc.info.get("cwd")) and (cwd + os.sep).startswith(root):
            found.add(proc.pid)
    return found


def commands_of(text: str) -> list[int]:
    """Pids of the processes whose command line mentions `text` (a stage's commands)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(text in arg for arg in p.info.get("cmdline") or ())]  # fmt: skip


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def finished(env, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (run := json.loads(faasci(env, "show", run_id, "--json").stdout))["status"] not in (
        "passed",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, f"run still {run['status']}"
        time.sleep(0.5)
    return run


def test_a_gateway_killed_mid_stage_leaves_no_orphan_and_up_heals(other_stack, make_repo, outside):
    """SIGKILL of the gateway while a stage runs: its function processes die with it; `faasci
    status` says so; `faasci up` replaces the gateway, kills the stage's orphaned commands, and
    the run ends passed (the lost attempt retried as infra), and a new run passes."""
    starts, release, marker = outside / "starts", outside / "release", outside / "marker"
    repo = make_repo({".faasci.yml": f"""\
service: killed
stages:
  unit:
    run:
      - echo start >> {starts}
      - until [ -e {release} ]; do sleep 0.1; done
      - echo done >> {marker}
    retry_on: [infra]
    backoff: {{initial_s: 0.5}}
"""})  # fmt: skip
    assert faasci(other_stack, "up").returncode == 0
    home = Path(other_stack["FAASCI_HOME"])
    before = function_processes(home)
    assert before
    run_id = json.loads(faasci(other_stack, "run", str(repo), "--detach", "--json").stdout)["id"]
    wait_for(starts.exists, 60, "the unit stage did not start")
    # its second command starts right after the first wrote `starts`
    wait_for(lambda: commands_of(str(release)), 30, "the stage's waiting command")

    os.kill(processes.pid_of(home / "run", "gateway"), signal.SIGKILL)
    wait_for(lambda: not function_processes(home), 5, "function processes outlived the gateway")
    status = faasci(other_stack, "status", "--json")
    assert status.returncode == 1 and "gateway" in json.loads(status.stdout)["down"]

    healed = faasci(other_stack, "up")
    assert healed.returncode == 0, healed.stderr
    functions = requests.get(f"{OTHER_GATEWAY}/system/functions",
                             auth=credentials(home / "secrets"), timeout=5).json()  # fmt: skip
    assert function_processes(home) == {f["pid"] for f in functions}
    assert not before & function_processes(home)
    assert commands_of(str(release)) == [], "the killed stage's commands are still running"
    assert faasci(other_stack, "status").returncode == 0

    release.touch()
    run = finished(other_stack, run_id)
    assert run["status"] == "passed", run
    attempts = run["stages"][0]["attempts"]
    assert attempts[-1]["status"] == "passed"
    assert all(a["reason"] == "infra" for a in attempts[:-1]), attempts
    assert marker.read_text().splitlines() == ["done"]  # the killed attempt never finished
    other = make_repo({".faasci.yml": 'service: other\nstages:\n  lint: {run: ["true"]}\n'})
    assert faasci(other_stack, "run", str(other)).returncode == 0


def test_up_starts_a_dead_nats_or_s3_under_a_live_gateway(other_stack, make_repo):
    """NATS killed, then S3, the registry, git daemon: `faasci status` names the dead part
    and exits 1; `faasci up` starts it without restarting the gateway, and runs pass again."""
    repo = make_repo({".faasci.yml": 'service: heal\nstages:\n  lint: {run: ["true"]}\n'})
    assert faasci(other_stack, "up").returncode == 0
    run_dir = Path(other_stack["FAASCI_HOME"]) / "run"
    gateway = processes.pid_of(run_dir, "gateway")
    for part, said in (("nats", "NATS"), ("s3", "S3"), ("registry", "image registry"),
                       ("git", "environment repository")):  # fmt: skip
        pid = processes.pid_of(run_dir, part)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda pid=pid: not processes.alive(pid), 5, f"{part} did not die")
        status = faasci(other_stack, "status")
        assert status.returncode == 1 and f"{part} " in status.stdout, status.stdout
        assert "down" in status.stdout.split(f"{part} ")[1].splitlines()[0]
        healed = faasci(other_stack, "up")
        assert healed.returncode == 0 and said in healed.stderr, healed.stderr
        assert processes.pid_of(run_dir, "gateway") == gateway
        done = faasci(other_stack, "run", str(repo), "--json")
        assert done.returncode == 0 and json.loads(done.stdout)["status"] == "passed", done
