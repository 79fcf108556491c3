"""The deploy stage's OpenFaaS target on the real local stack: the image a run's build stage
pushed is deployed as a function through the gateway's REST API, runs as a container of
the stack's engine (pulled from its registry by digest), and answers through the gateway;
a run whose image does not come up fails at deploy and the function is rolled back to the
previous digest, still answering. The real faas-cli deploys and invokes such an image too.

Two images are built, by the two runs' build stages (both on the offline base image); the
faas-cli test reuses the first."""

import os
import subprocess
import time

import pytest
import requests
from conftest import commit_all, log_of, start_run, wait_for_run

from faasci.local.config import openfaas_tool
from faasci.local.openfaas_api import credentials

FUNCTION = "deploy-e2e"
CLI_FUNCTION = "deploy-e2e-cli"

SERVER = """\
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ.get("VERSION", "?")


class Handler(BaseHTTPRequestHandler):
    def answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.answer(json.dumps({"status": "ok", "version": VERSION, "path": self.path}).encode())

    def do_POST(self):  # what `faas-cli invoke` sends: echoed
        size = int(self.headers.get("Content-Length") or 0)
        self.answer(b"echo:" + self.rfile.read(size))


ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()  # OpenFaaS's port
"""
GOOD_CMD = 'CMD ["python3", "/app/server.py"]'
# Exits at start, as a service missing its configuration does.
BROKEN_CMD = (
    'CMD ["python3", "-c", "import sys; print(\'boom: no DATABASE_URL\', flush=True); sys.exit(3)"]'
)


def dockerfile(base: str, version: str, cmd: str) -> str:
    return f"""\
FROM {base}
COPY server.py /app/server.py
ENV VERSION={version}
EXPOSE 8080
{cmd}
"""


@pytest.fixture(scope="module")
def api(stack):
    """The gateway's /system API with its admin credentials."""
    session = requests.Session()
    session.auth = credentials(stack.secrets_dir)
    yield session
    for name in (FUNCTION, CLI_FUNCTION):  # leave the stack with only its own functions
        session.delete(f"{stack.gateway_url}/system/functions", json={"functionName": name},
                       timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory, engine_with_base):
    """A repository whose pipeline builds the service's image and deploys it as FUNCTION."""
    repo = tmp_path_factory.mktemp("deploy") / "svc"
    repo.mkdir()
    (repo / ".faasci.yml").write_text(f"""\
service: deploy-svc
stages:
  build:
    docker: {{file: Dockerfile}}
    scan: false  # the Trivy gate has tests of its own
    retries: 0
  deploy:
    openfaas: {{function: {FUNCTION}, path: /health, timeout: 30}}
    retries: 0
""")
    (repo / "server.py").write_text(SERVER)
    (repo / "Dockerfile").write_text(dockerfile(engine_with_base, "v1", GOOD_CMD))
    subprocess.run(["git", "init", "--quiet", "--initial-branch=main"], cwd=repo, check=True)
    commit_all(repo, "the service, v1")
    return repo


@pytest.fixture(scope="module")
def first(stack, gateway, api, service):
    """The first run: built, deployed, healthy."""
    run = wait_for_run(gateway, start_run(gateway, service), timeout=600)
    assert run["status"] == "passed", failed_logs(gateway, run)
    return run


def failed_logs(gateway, run: dict) -> str:
    """The logs of a run's failed stages, for an assertion's message."""
    failed = [s["name"] for s in run["stages"] if s["status"] == "failed"]
    return "\n".join(log_of(gateway, run["id"], name) for name in failed)


def status_of(stack, api, name: str) -> dict:
    resp = api.get(f"{stack.gateway_url}/system/function/{name}", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_the_built_image_is_deployed_as_a_function_and_answers(stack, gateway, api, first):
    """The deploy stage deploys the run's image by digest; the gateway lists the function
    at that digest with a replica available, and it answers through /function/<name>."""
    image = first["image"]
    assert image.startswith(f"{stack.registry}/deploy-svc@sha256:")
    deploy = next(s for s in first["stages"] if s["name"] == "deploy")["attempts"][0]
    record = deploy["deployment"]
    assert record["target"] == "openfaas" and record["function"] == FUNCTION
    assert record["image"] == image and record["rolled_back_to"] is None
    assert record["healthy_after_s"] > 0
    status = status_of(stack, api, FUNCTION)
    assert status["image"] == image and status["availableReplicas"] == 1
    answer = requests.get(f"{stack.gateway_url}/function/{FUNCTION}/health", timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "version": "v1", "path": "/health"}
    assert f"function {FUNCTION} is healthy at {image}" in log_of(gateway, first["id"], "deploy")


def test_an_image_that_does_not_come_up_is_rolled_back(stack, gateway, api, service, first):
    """A second run's image exits at start: deploy fails (not retried) with the platform's
    account of it, the function is rolled back to the first run's digest and answers."""
    (service / "Dockerfile").write_text(dockerfile("localhost/faasci-base:bookworm", "v2",
                                                   BROKEN_CMD))  # fmt: skip
    commit_all(service, "v2, which needs a database")
    run = wait_for_run(gateway, start_run(gateway, service), timeout=600)
    log = log_of(gateway, run["id"], "deploy")
    assert run["status"] == "failed", log
    assert run["image"] != first["image"]
    deploy = next(s for s in run["stages"] if s["name"] == "deploy")
    assert deploy["status"] == "failed" and len(deploy["attempts"]) == 1
    attempt = deploy["attempts"][0]
    assert attempt["reason"] == "rollout", f"{attempt['error']}\n{log}"
    assert f"function {FUNCTION} was not healthy" in attempt["error"]
    assert "availableReplicas 0" in attempt["error"]
    assert "rolled back to sha256:" in attempt["error"]
    record = attempt["deployment"]
    assert record["image"] == run["image"]
    assert record["previous"] == record["rolled_back_to"] == first["image"]
    assert "boom: no DATABASE_URL" in log  # the function's own last words (/system/logs)
    assert f"rolled back: function {FUNCTION} is healthy again at {first['image']}" in log
    status = status_of(stack, api, FUNCTION)
    assert status["image"] == first["image"] and status["availableReplicas"] == 1
    answer = requests.get(f"{stack.gateway_url}/function/{FUNCTION}/health", timeout=10)
    assert answer.status_code == 200 and answer.json()["version"] == "v1"


def test_faas_cli_deploys_and_invokes_an_image_only_function(stack, api, first, tmp_path):
    """The real faas-cli deploys the pushed image by digest (no stack.yml entry: a container
    in the default process mode) and invokes it through the gateway."""
    binary = openfaas_tool("faas-cli")
    assert binary, "faas-cli not found: set OPENFAAS_BIN or put it on PATH"
    env = {**os.environ, "OPENFAAS_CONFIG": str(tmp_path)}

    def cli(*args: str, stdin: str | None = None) -> str:
        # Away from the project's stack.yml, which faas-cli would read instead.
        done = subprocess.run([binary, *args, "--gateway", stack.gateway_url], env=env,
                              cwd=tmp_path, input=stdin, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    password = (stack.secrets_dir / "basic-auth-password").read_text()
    cli("login", "--username", "admin", "--password-stdin", stdin=password)
    deployed = cli("deploy", "--image", first["image"], "--name", CLI_FUNCTION)
    assert "202 Accepted" in deployed or "Deployed" in deployed, deployed
    deadline = time.monotonic() + 60
    while status_of(stack, api, CLI_FUNCTION)["availableReplicas"] < 1:
        assert time.monotonic() < deadline, status_of(stack, api, CLI_FUNCTION)
        time.sleep(0.5)
    assert status_of(stack, api, CLI_FUNCTION)["image"] == first["image"]
    assert cli("invoke", CLI_FUNCTION, stdin="hello") == "echo:hello"


def test_two_runs_deploying_one_function_at_once_roll_out_one_after_the_other(
    stack, gateway, api, service, first, engine_with_base
):
    """Two runs of two versions started at once: both pass, each healthy at its own digest;
    the later rollout found the earlier one's image in place (one rollout at a time)."""
    started = []
    for version in ("v3", "v4"):
        (service / "Dockerfile").write_text(dockerfile(engine_with_base, version, GOOD_CMD))
        commit_all(service, version)
        started.append(start_run(gateway, service))
    ended = [wait_for_run(gateway, run_id, timeout=600) for run_id in started]
    assert [r["status"] for r in ended] == ["passed", "passed"], [failed_logs(gateway, r)
                                                                  for r in ended]  # fmt: skip
    records = [next(s for s in r["stages"] if s["name"] == "deploy")["attempts"][-1]
               ["deployment"] for r in ended]  # fmt: skip
    assert {d["image"] for d in records} == {r["image"] for r in ended} and len(records) == 2
    # Whichever went second replaced what the first left healthy.
    a, b = records
    earlier, later = (a, b) if b["previous"] == a["image"] else (b, a)
    assert later["previous"] == earlier["image"]
    assert status_of(stack, api, FUNCTION)["image"] == later["image"]
