"""`faasci up --containers` on a stack of its own: every function of stack.yml built into its
image and run as a container behind the local gateway; the example's pipeline (its CI half)
passes through them; a container that dies is replaced; `faasci down` removes them all.

Images are built in the tests' engine folder (.faasci/podman-test<offset>/, shared with
test_bundle.py and kept between sessions), so only a fresh machine pays the base image and
dependency layers. The sample repository is a tmp folder mounted through FAASCI_LOCAL_REPOS.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import FAASCI, PORT_OFFSET, ROOT, SAMPLE, commit_all, git, stack_ports, stopped

from faasci.local import containers
from faasci.local.config import stack_tag
from faasci.local.engine import Engine

PORTS = stack_ports(31080, 27222, 31333)
GATEWAY = PORTS["OPENFAAS_URL"]
ENGINE_HOME = ROOT / ".faasci" / f"podman-test{PORT_OFFSET or ''}"
FUNCTIONS = sorted(yaml.safe_load((ROOT / "stack.yml").read_text())["functions"])


def faasci(env, *args, timeout=600):
    return subprocess.run([FAASCI, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def ci_half(pipeline: dict) -> dict:
    """The example's pipeline without its delivery steps (image build, promotion, rollout):
    those need an engine the function containers can reach, which `--containers` does not
    give them (README); integration then tests the checkout, as before the image."""
    for name, stage in pipeline["stages"].items():
        for key in ("docker", "gitops", "openfaas", "image"):
            stage.pop(key, None)
        stage["run"] = [c.replace("INVENTORY_APP=/app ", "") for c in stage.get("run") or
                        [f"echo {name} delivers nothing here"]]  # fmt: skip
    return pipeline


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`faasci up --containers` (timed), with a committed copy of the sample service in a
    folder the containers mount; `faasci down` afterwards whatever happened."""
    tmp = tmp_path_factory.mktemp("containers")
    repo = tmp / "repos" / "sample-service"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
    pipeline = repo / ".faasci.yml"
    pipeline.write_text(yaml.safe_dump(ci_half(yaml.safe_load(pipeline.read_text()))))
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "sample service")
    env = {**os.environ, **PORTS, "FAASCI_HOME": str(tmp / "home"),
           "FAASCI_STACK": str(ROOT / "stack.yml"), "FAASCI_PODMAN_HOME": str(ENGINE_HOME),
           "FAASCI_LOCAL_REPOS": str(repo.parent)}  # fmt: skip
    env.pop("FAASCI_SECRETS_DIR", None)
    started = time.monotonic()
    up = faasci(env, "up", "--containers", timeout=1500)
    print(f"faasci up --containers: {time.monotonic() - started:.1f}s\n{up.stderr}")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, repo
    finally:
        stopped(env)


def system(env, path: str) -> requests.Response:
    """GET /system/<path> with the gateway's basic-auth credentials."""
    secrets = Path(env["FAASCI_HOME"]) / "secrets"
    auth = tuple((secrets / f"basic-auth-{k}").read_text().strip() for k in ("user", "password"))
    return requests.get(f"{GATEWAY}/system/{path}", auth=auth, timeout=10)


def running_containers(env) -> dict[str, str]:
    """{function: state} of the stack's containers, as podman lists them."""
    label = f"label={containers.LABEL}={env['FAASCI_HOME']}"
    done = Engine(ENGINE_HOME).podman("ps", "--all", "--filter", label, "--format", "json")
    assert done.returncode == 0, done.stderr
    return {c["Labels"]["faasci.function"]: c["State"] for c in json.loads(done.stdout)}


def test_every_function_runs_in_its_own_container(stack):
    """One running container per function of stack.yml, each ready behind the gateway."""
    env, _ = stack
    assert running_containers(env) == dict.fromkeys(FUNCTIONS, "running")
    listed = {fn["name"]: fn for fn in system(env, "functions").json()}
    assert sorted(listed) == FUNCTIONS
    assert all(fn["availableReplicas"] == 1 for fn in listed.values()), listed
    log = Path(env["FAASCI_HOME"]) / "logs" / "runs.log"  # the container's output
    assert "Watchdog mode: http" in log.read_text()


def test_sample_pipeline_passes_in_containers(stack):
    """`faasci run --json` on the sample service passes, every stage run by a container."""
    env, repo = stack
    started = time.monotonic()
    done = faasci(env, "run", str(repo), "--json", timeout=900)
    print(f"pipeline in containers: {time.monotonic() - started:.1f}s")
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "passed"
    assert [s["status"] for s in run["stages"]] == ["passed"] * len(run["stages"])
    # A stage's worker is "<hostname>:<pid>": each stage ran in its own container.
    hosts = {s["attempts"][-1]["worker"].rsplit(":", 1)[0] for s in run["stages"]}
    assert len(hosts) == len(run["stages"]) and os.uname().nodename not in hosts, hosts


def test_uncommitted_work_is_snapshotted_from_the_read_only_mount(stack):
    """A working tree with uncommitted changes runs as a snapshot, though the containers
    see the repository read-only."""
    env, repo = stack
    (repo / "NOTES.md").write_text("uncommitted\n")
    try:
        done = faasci(env, "run", str(repo), "--json", timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        run = json.loads(done.stdout)
        assert run["status"] == "passed" and run["snapshot"] is True
    finally:
        (repo / "NOTES.md").unlink()


def test_a_dead_container_is_replaced(stack):
    """A function container killed from outside comes back (a new container) and is ready."""
    env, _ = stack
    name = f"faasci-{stack_tag(Path(env['FAASCI_HOME']))}-runs"
    killed = Engine(ENGINE_HOME).podman("kill", name)
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 60
    while True:
        fn = system(env, "function/runs").json()
        if fn["restarts"] >= 1 and fn["availableReplicas"] == 1:
            break
        assert time.monotonic() < deadline, fn
        time.sleep(0.5)
    assert running_containers(env)["runs"] == "running"


def test_down_removes_every_container(stack):
    """`faasci down` stops the stack and removes its containers."""
    env, _ = stack
    down = faasci(env, "down", timeout=180)
    assert down.returncode == 0, down.stderr
    assert running_containers(env) == {}
