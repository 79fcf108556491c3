"""The deployable bundle: stack.yml follows faas-cli's schema, the real faas-cli lays out its
build contexts, and a function image built from one of them runs behind the real of-watchdog.

The image tests use the container engine (faasci.local.engine: podman's Docker-compatible
API) with its state in .faasci/podman-test<offset>/, kept between sessions like .venv/: the
first session makes the debootstrap'ed base image (about 50 s) and the dependency layers
(about 10 s); later ones reuse them. Two images are built from ONE shrinkwrap of a test
project: stack.yml's `runs`, and `sleepy` (a handler that sleeps for ?s= seconds, for the
timeout and drain checks), both from the template, so they share their dependency layers.
A missing tool (podman, faas-cli, of-watchdog, debootstrap) fails the tests, never skips.
"""

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import docker
import pytest
import requests
import yaml
from conftest import PORT_OFFSET
from croniter import croniter

from faasci.local import containers, engine
from faasci.local.config import openfaas_tool

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "python3-ci"
ENGINE_HOME = REPO / ".faasci" / f"podman-test{PORT_OFFSET or ''}"
TEST_LABEL = {"faasci.test": f"bundle{PORT_OFFSET}"}
IMAGES = {
    "runs": "localhost/faasci-test/runs:latest",
    "sleepy": "localhost/faasci-test/sleepy:latest",
}

CONTEXT_FILES = (
    "Dockerfile", "index.py", "requirements.txt", "template.yml", "function/handler.py",
    "function/requirements.txt", "function/shared/requirements.txt",
    "function/shared/faasci/__init__.py",
)  # fmt: skip

SLEEPY = '''"""Sleeps for ?s= seconds, then answers: a slow request for the watchdog checks."""

import time


def handle(event, context):
    seconds = float(event.query.get("s", "0"))
    time.sleep(seconds)
    return {"statusCode": 200, "body": {"slept": seconds}}
'''


def load_stack() -> dict:
    return yaml.safe_load((REPO / "stack.yml").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(build: Path) -> dict[str, int]:
    """{relative path: mode} of every file and folder under `build`."""
    return {str(p.relative_to(build)): p.stat().st_mode & 0o777 for p in build.rglob("*")}


# --- stack.yml and the build contexts ------------------------------------------------------


@pytest.fixture(scope="module")
def faas_cli() -> str:
    binary = openfaas_tool("faas-cli")
    assert binary, "faas-cli not found in OPENFAAS_BIN (default ../shared/openfaas/bin) or PATH"
    return binary


@pytest.fixture
def outside_ci(monkeypatch):
    """faas-cli makes its build folders 0700, except under CI=true|1 (0777 less the umask):
    tests take the strict case, the one that broke images, even when CI runs them."""
    monkeypatch.delenv("CI", raising=False)


def test_faas_cli_shrinkwrap_lays_out_every_function(faas_cli, tmp_path, outside_ci):
    """The real `faas-cli build --shrinkwrap -f stack.yml` (in a scratch copy) writes every
    function's context: the template, the handler in function/, the library in
    function/shared/; the folders it makes are 0700."""
    build = engine.shrinkwrap(REPO / "stack.yml", tmp_path / "work")
    names = list(load_stack()["functions"])
    assert sorted(p.name for p in build.iterdir()) == sorted(names)
    for name in names:
        ctx = build / name
        for rel in CONTEXT_FILES:
            assert (ctx / rel).is_file(), f"{name}: {rel}"
        for folder in (build, ctx, ctx / "function"):
            assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert not (REPO / "build").exists(), "the repository's own build/ was touched"


@pytest.mark.parametrize("ci", [None, "true"])
def test_python_shrinkwrap_matches_faas_cli(faas_cli, tmp_path, monkeypatch, ci):
    """Without faas-cli, the project's own shrinkwrap makes the same files with the same
    modes, outside CI and under CI=true."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    real = tree(engine.shrinkwrap(REPO / "stack.yml", tmp_path / "real"))
    monkeypatch.setattr(engine, "openfaas_tool", lambda name: None)
    ours = tree(engine.shrinkwrap(REPO / "stack.yml", tmp_path / "ours"))
    assert ours == real


def test_stack_top_level_follows_faas_cli_schema():
    """stack.yml has version 1.0, the openfaas provider with a gateway URL, and functions."""
    stack = load_stack()
    assert str(stack["version"]) == "1.0"
    assert stack["provider"]["name"] == "openfaas"
    assert stack["provider"]["gateway"].startswith(("http://", "https://"))
    assert isinstance(stack["functions"], dict) and stack["functions"]


def test_every_function_uses_the_template_and_has_a_handler():
    """Every function is lang python3-ci with an image and a handler folder holding handler.py."""
    for name, fn in load_stack()["functions"].items():
        assert fn["lang"] == TEMPLATE, name
        assert fn.get("image"), name
        handler = REPO / fn["handler"]
        assert handler.is_dir(), f"{name}: {handler}"
        assert (handler / "handler.py").is_file(), f"{name}: no handler.py"


def test_shared_library_is_copied_into_every_build():
    """configuration.copy lists ./shared, the folder holding the faasci package."""
    stack = load_stack()
    assert "./shared" in stack["configuration"]["copy"]
    assert (REPO / "shared" / "faasci" / "__init__.py").is_file()
    assert (REPO / "shared" / "requirements.txt").is_file()


def test_template_declares_language_and_fprocess():
    """template/python3-ci has template.yml (language, fprocess), Dockerfile and index.py."""
    folder = REPO / "template" / TEMPLATE
    meta = yaml.safe_load((folder / "template.yml").read_text())
    assert meta["language"] == TEMPLATE
    assert meta["fprocess"] == "python index.py"
    for name in ("Dockerfile", "index.py", "requirements.txt", "function/handler.py"):
        assert (folder / name).is_file(), name
    templates = load_stack()["configuration"].get("templates") or []
    assert any(t["name"] == TEMPLATE for t in templates)


def test_a_function_is_scheduled_by_cron_connector():
    """At least one function carries topic: cron-function and a valid five-field schedule."""
    scheduled = {
        name: fn["annotations"]["schedule"]
        for name, fn in load_stack()["functions"].items()
        if (fn.get("annotations") or {}).get("topic") == "cron-function"
    }
    assert scheduled, "no function has the cron-function topic"
    for name, schedule in scheduled.items():
        assert len(schedule.split()) == 5, f"{name}: cron-connector takes five fields"
        assert croniter.is_valid(schedule), f"{name}: {schedule!r}"


# --- images built from the contexts, run behind of-watchdog ---------------------------------


@pytest.fixture(scope="module")
def podman():
    """The container engine of the tests (its API service stopped at the end)."""
    e = engine.Engine(ENGINE_HOME)
    e.start()
    yield e
    label = f"faasci.test={TEST_LABEL['faasci.test']}"
    for c in e.client.containers.list(all=True, filters={"label": label}):
        c.remove(force=True)
    e.stop()


@pytest.fixture(scope="module")
def images(podman, faas_cli, tmp_path_factory) -> dict[str, str]:
    """`runs` and `sleepy` built from one faas-cli shrinkwrap of a test project, its folders
    0700 as faas-cli makes them outside CI."""
    project = tmp_path_factory.mktemp("project")
    for rel in ("template", "shared", "functions/runs"):
        shutil.copytree(REPO / rel, project / rel, ignore=shutil.ignore_patterns("__pycache__"))
    sleepy = project / "functions" / "sleepy"
    sleepy.mkdir()
    (sleepy / "handler.py").write_text(SLEEPY)
    (sleepy / "requirements.txt").write_text("")
    functions = {
        name: {"lang": TEMPLATE, "handler": f"./functions/{name}", "image": image}
        for name, image in IMAGES.items()
    }
    stack = {
        "version": 1.0,
        "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
        "configuration": {"templates": [{"name": TEMPLATE}], "copy": ["./shared"]},
        "functions": functions,
    }
    (project / "stack.yml").write_text(yaml.safe_dump(stack))
    log = tmp_path_factory.mktemp("logs") / "build.log"
    try:
        with pytest.MonkeyPatch.context() as mp:  # the strict layout: 0700 folders (outside_ci)
            mp.delenv("CI", raising=False)
            engine.build_functions(podman, project / "stack.yml", None, IMAGES, log)
    finally:
        print(log.read_text()[-3000:] if log.exists() else "no build log")
    return IMAGES


def run(podman, image: str, name: str, env: dict | None = None, volumes: dict | None = None):
    """Run `image` as the local stack does (slirp4netns, 8080 published on 127.0.0.1) but as
    the image's own user; (container, base URL) once /_/health answers 200 and index.py
    answers /_/ready (of-watchdog writes its lock file, hence /_/health, before the
    function's server listens, and answers 500 to calls until it does)."""
    name = f"faasci-test{PORT_OFFSET}-{name}"
    with contextlib.suppress(docker.errors.NotFound):  # a leftover of an interrupted session
        podman.client.containers.get(name).remove(force=True)
    port = free_port()
    container = podman.client.containers.run(
        image, name=name, detach=True, labels=TEST_LABEL, environment=env or {},
        network_mode=containers.NETWORK, ports={"8080/tcp": ("127.0.0.1", port)},
        volumes=volumes or {},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            health = requests.get(f"{url}/_/health", timeout=1)
            ready = requests.get(f"{url}/_/ready", timeout=5)
            if health.status_code == 200 and ready.headers.get("Server") == "faasci":
                return container, url
        except requests.RequestException:
            pass
        container.reload()
        logs = container.logs().decode(errors="replace")[-2000:]
        assert container.status == "running", f"{name} exited:\n{logs}"
        assert time.monotonic() < deadline, f"{name}: /_/health not 200 after 30 s:\n{logs}"
        time.sleep(0.2)


def test_function_image_runs_behind_of_watchdog_as_non_root(podman, images):
    """The `runs` image: of-watchdog is the container's process (user 10001, not root), its
    /_/health is 200, and a call reaches the handler and the library through it."""
    attrs = podman.client.images.get(images["runs"]).attrs
    assert attrs["Config"]["User"].split(":")[0] == "10001"
    container, url = run(podman, images["runs"], "runs")
    # Its first process, seen from the host (rootful podman maps no uids); `exec` is not
    # used: podman 4.3 leaves the conmon of an exec session behind.
    pid = container.attrs["State"]["Pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"fwatchdog"
    uids = Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[:2]
    assert uids == ["10001", "10001"], uids  # real and effective
    library = Path(f"/proc/{pid}/root/home/app/function/shared/faasci")  # the image's files
    assert (library / "stage.py").is_file()
    assert not (library / "local").exists() and not (library / "cli.py").exists()  # people's
    resp = requests.post(url, json={"repo": "relative/path"}, timeout=10)
    assert resp.status_code == 401, resp.text  # the router asks who is calling, first
    assert resp.json()["field"] == "Authorization"
    container.remove(force=True)


def test_exec_timeout_answers_504(podman, images):
    """A request over the watchdog's exec_timeout gets 504 when the timeout strikes."""
    container, url = run(podman, images["sleepy"], "timeout", env={"exec_timeout": "2s"})
    assert requests.get(f"{url}/?s=0", timeout=10).json() == {"slept": 0.0}
    started = time.monotonic()
    resp = requests.get(f"{url}/?s=6", timeout=20)
    took = time.monotonic() - started
    assert resp.status_code == 504, resp.text
    assert 1.5 < took < 5, took
    container.remove(force=True)


def test_podman_stop_drains_the_request_in_flight(podman, images):
    """`podman stop` (SIGTERM, 20 s grace) during a 5-second request: the request ends 200,
    /_/health fails meanwhile, and the container exits by itself well before SIGKILL."""
    container, url = run(podman, images["sleepy"], "drain")
    answer = {}

    def slow_request():
        answer["resp"] = requests.get(f"{url}/?s=5", timeout=30)

    caller = threading.Thread(target=slow_request)
    caller.start()
    time.sleep(1)  # the request is in flight
    started = time.monotonic()
    stopping = threading.Thread(
        target=podman.podman, args=("stop", "-t", "20", container.name), kwargs={"check": True}
    )
    stopping.start()
    time.sleep(1)
    assert requests.get(f"{url}/_/health", timeout=5).status_code != 200
    caller.join(30)
    stopping.join(30)
    took = time.monotonic() - started
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert answer["resp"].json() == {"slept": 5.0}
    container.reload()
    state = container.attrs["State"]
    assert state["Status"] == "exited", state
    assert state["ExitCode"] != 137, f"killed after the grace period: {state}"
    assert took < 18, f"podman stop took {took:.1f}s (grace 20 s)"
    container.remove(force=True)


def test_ready_names_nats_url_when_nats_is_unreachable(podman, images, tmp_path):
    """Started with NATS unreachable, the function answers /_/ready 503 naming NATS_URL
    within 5 s (its secrets are mounted, so NATS is the first thing in the way)."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("s3-access-key", "s3-secret-key"):
        (secrets / name).write_text("x")
    os.chmod(secrets, 0o755)  # readable by the image's user
    nobody = free_port()  # nothing listens there
    env = {
        "NATS_URL": f"nats://{containers.HOST_FROM_CONTAINER}:{nobody}",
        "S3_ENDPOINT": f"http://{containers.HOST_FROM_CONTAINER}:{nobody}",
    }
    volumes = {str(secrets): {"bind": containers.SECRETS_MOUNT, "mode": "ro"}}
    started = time.monotonic()
    container, url = run(podman, images["runs"], "ready", env=env, volumes=volumes)
    while True:
        resp = requests.get(f"{url}/_/ready", timeout=5)
        if resp.status_code == 503 and "NATS_URL" in resp.text:
            break
        assert time.monotonic() - started < 5, (resp.status_code, resp.text)
        time.sleep(0.2)
    assert json.loads(resp.text)["setting"] == "NATS_URL", resp.text
    container.remove(force=True)


def test_engine_uses_its_own_configuration(podman):
    """Podman runs on the engine folder's configuration: runc, cgroupfs, its own storage."""
    fmt = "{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphRoot}}"
    done = podman.podman("info", "--format", fmt)
    assert done.returncode == 0, done.stderr
    runtime, cgroups, graphroot = done.stdout.split()
    assert (runtime, cgroups) == ("runc", "cgroupfs")
    assert Path(graphroot) == ENGINE_HOME / "storage"
    assert podman.client.ping()
