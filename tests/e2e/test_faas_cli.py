"""The real faas-cli (OPENFAAS_BIN, else PATH) against the session's local stack: login,
deploy, list, describe, invoke (sync and async), secrets, logs, remove and deploy again;
and the gateway's /system API directly: basic auth on every route, deployments that change
or not, scaling, and clear errors.

Every function of stack.yml is deployed and ready again afterwards, for the other tests."""

import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from conftest import ROOT

from faasci import stack as stack_file
from faasci.local.config import openfaas_tool
from faasci.local.cron import Scheduler
from faasci.local.gateway import follow_schedules
from faasci.local.openfaas_api import credentials

FUNCTIONS = set(stack_file.load(ROOT / "stack.yml", env={}).functions)
STATUS_FIELDS = {
    "name", "image", "namespace", "envProcess", "envVars", "secrets", "labels", "annotations",
    "limits", "requests", "createdAt", "replicas", "availableReplicas", "invocationCount",
    "readOnlyRootFilesystem", "constraints", "pid", "restarts",
}  # fmt: skip


@pytest.fixture(scope="module")
def api(stack):
    """A client of the gateway's /system API, with its credentials."""
    session = requests.Session()
    session.auth = credentials(stack.secrets_dir)
    session.url = f"{stack.gateway_url}/system"
    return session


@pytest.fixture(scope="module")
def cli(stack, api, tmp_path_factory):
    """Run faas-cli at the repository's root against the test stack, logged in, with a
    config folder of its own. Afterwards every function of stack.yml is deployed again."""
    binary = openfaas_tool("faas-cli")
    assert binary, "faas-cli not found: set OPENFAAS_BIN or put it on PATH"
    env = {**os.environ, "OPENFAAS_CONFIG": str(tmp_path_factory.mktemp("faas-cli"))}

    def run(*args: str, input: str | None = None, check: bool = True):
        done = subprocess.run([binary, *args, "--gateway", stack.gateway_url], cwd=ROOT,
                              env=env, input=input, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert not check or done.returncode == 0, done.stdout + done.stderr
        return done

    password = (stack.secrets_dir / "basic-auth-password").read_text()
    login = run("login", "--username", "admin", "--password-stdin", input=password)
    assert "credentials saved for admin" in login.stdout
    yield run
    run("deploy", "-f", "stack.yml")
    wait_ready(api, FUNCTIONS)


def listed(api) -> dict[str, dict]:
    """The stack's own functions as the gateway lists them (deploy stages of the session's
    runs may have deployed services beside them)."""
    return {f["name"]: f for f in api.get(f"{api.url}/functions").json()
            if f["name"] in FUNCTIONS}  # fmt: skip


def wait_ready(api, names, timeout: float = 60) -> dict[str, dict]:
    """Wait until each of these functions is deployed with one available replica."""
    deadline = time.monotonic() + timeout
    while True:
        functions = listed(api)
        if all(functions.get(n, {}).get("availableReplicas") == 1 for n in names):
            return functions
        assert time.monotonic() < deadline, f"not ready: {names}: {functions}"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_login_refuses_a_wrong_password(cli):
    """faas-cli login checks the credentials against the gateway."""
    done = cli("login", "--username", "admin", "--password-stdin", input="wrong", check=False)
    assert done.returncode != 0 and "incorrect" in done.stdout + done.stderr


ROUTES = [
    ("GET", "/functions"), ("POST", "/functions"), ("PUT", "/functions"),
    ("DELETE", "/functions"), ("GET", "/functions?namespace=openfaas-fn"),
    ("GET", "/function/unit"), ("GET", "/function/unit?namespace=openfaas-fn"),
    ("POST", "/scale-function/unit"), ("GET", "/namespaces"), ("GET", "/info"),
    ("GET", "/secrets"), ("POST", "/secrets"), ("PUT", "/secrets"), ("DELETE", "/secrets"),
    ("GET", "/logs?name=unit"), ("GET", "/no-such-route"), ("PATCH", "/functions"), ("GET", ""),
]  # fmt: skip


@pytest.mark.parametrize("auth", [None, ("admin", "wrong"), ("root", "")])
def test_every_system_route_needs_credentials(stack, api, auth):
    """Without credentials, or with wrong ones, every /system route answers 401 with
    WWW-Authenticate and a JSON error, before looking at the request."""
    for method, route in ROUTES:
        resp = requests.request(method, f"{api.url}{route}", auth=auth, json={}, timeout=10)
        assert resp.status_code == 401, (method, route, resp.text)
        assert resp.headers["WWW-Authenticate"].startswith("Basic realm="), route
        assert "error" in resp.json(), route


def test_invocations_and_health_need_no_gateway_credentials(stack, token):
    """/function/*, /async-function/* and /healthz need no gateway credentials, as in
    OpenFaaS: the function itself asks for a bearer token."""
    url = stack.gateway_url
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    viewer = {"Authorization": f"Bearer {token('viewer')}"}
    for path in ("runs", "runs/", "runs.openfaas-fn", "runs.openfaas-fn/"):
        resp = requests.get(f"{url}/function/{path}", params={"limit": 1}, timeout=30)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"], path
        resp = requests.get(f"{url}/function/{path}", params={"limit": 1}, headers=viewer,
                            timeout=30)  # fmt: skip
        assert resp.status_code == 200 and "runs" in resp.json(), path
    resp = requests.get(f"{url}/function/runs.other-ns", timeout=10)
    assert resp.status_code == 404 and resp.json()["field"] == "namespace"


def test_deploying_the_unchanged_stack_restarts_nothing(cli, api):
    """faas-cli deploy -f stack.yml (PUT of each function) keeps every process as it is."""
    before = listed(api)
    assert set(before) == FUNCTIONS
    done = cli("deploy", "-f", "stack.yml")
    assert done.stdout.count("Deployed. 202") == len(FUNCTIONS), done.stdout
    after = wait_ready(api, FUNCTIONS)
    assert {n: f["pid"] for n, f in after.items()} == {n: f["pid"] for n, f in before.items()}


def test_list_shows_every_function(cli, api):
    """faas-cli list names every function of stack.yml, with its image and creation time."""
    done = cli("list", "--verbose")
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:]}
    assert set(rows) >= FUNCTIONS
    assert "localhost:5000/faasci/unit:0.1.0" in rows["unit"]
    assert "0001-01-01" not in done.stdout
    for fn in listed(api).values():
        assert set(fn) == STATUS_FIELDS
        created = datetime.fromisoformat(fn["createdAt"])
        assert timedelta(0) < datetime.now(UTC) - created < timedelta(hours=6), fn["createdAt"]
        assert fn["namespace"] == "openfaas-fn" and fn["replicas"] == 1


def test_describe_shows_environment_secrets_and_labels(cli):
    """faas-cli describe unit shows its process, environment, secrets, labels and limits."""
    out = cli("describe", "unit").stdout
    for expected in ("Status:             Ready", "Function Process:   python index.py",
                     "S3_BUCKET: faasci", "exec_timeout: 6h15m", " - s3-access-key",
                     "com.openfaas.scale.max: 10", "Memory: 1Gi"):  # fmt: skip
        assert expected in out, out


def test_invoke_a_listing(cli, token):
    """faas-cli invoke runs (GET /function/runs.openfaas-fn) with a viewer's bearer token
    answers the run listing."""
    done = cli("invoke", "runs", "--method", "GET", "--query", "limit=2",
               "--header", f"Authorization: Bearer {token('viewer')}", input="")  # fmt: skip
    assert isinstance(json.loads(done.stdout)["runs"], list)


def test_invoke_async_calls_back(cli, sample_repo, callback_receiver, token):
    """faas-cli invoke --async with X-Callback-Url: the stage runs, then the callback
    carries its result with X-Call-Id, X-Function-Status and X-Function-Name."""
    url, received = callback_receiver
    done = cli("invoke", "--async", "unit", "--content-type", "application/json",
               "--header", f"X-Callback-Url: {url}",
               "--header", f"Authorization: Bearer {token('runner')}",
               input=json.dumps({"repo": str(sample_repo)}))  # fmt: skip
    assert "submitted asynchronously" in done.stdout + done.stderr
    headers, body = received.get(timeout=120)
    uuid.UUID(headers["X-Call-Id"])
    assert headers["X-Function-Name"] == "unit" and headers["X-Function-Status"] == "200"
    assert json.loads(body)["status"] == "passed"


def test_secrets_create_list_update_remove(cli, api, stack):
    """faas-cli secret create/list/update/remove: one 0600 file each in the secrets folder;
    listed by name only; a value never printed or logged."""
    name, value, updated = "faas-cli-test", f"v1-{secrets.token_hex(8)}", secrets.token_hex(8)
    path = stack.secrets_dir / name
    try:
        assert "Created" in cli("secret", "create", name, input=value).stdout
        assert path.read_text() == value and path.stat().st_mode & 0o777 == 0o600
        again = cli("secret", "create", name, input=value)
        assert "already exists" in again.stdout
        listing = cli("secret", "list").stdout
        assert name in listing.split() and value not in listing
        assert "basic-auth-password" not in listing  # the gateway's own is not a function's
        assert {"name": name, "namespace": "openfaas-fn"} in api.get(f"{api.url}/secrets").json()
        cli("secret", "update", name, input=updated)
        assert path.read_text() == updated and path.stat().st_mode & 0o777 == 0o600
        cli("secret", "remove", name)
        assert not path.exists()
        gone = cli("secret", "remove", name, check=False)
        assert gone.returncode != 0 and "Unable to find secret" in gone.stdout + gone.stderr
    finally:
        path.unlink(missing_ok=True)
    logs = "".join(p.read_text(errors="replace") for p in stack.logs.glob("*.log"))
    assert value not in logs and updated not in logs


@pytest.mark.parametrize("name", ["../outside", "a/b", "UPPER", "", "-x", "basic-auth-user"])
def test_bad_secret_names_are_refused(api, stack, name):
    """A secret name must be DNS-like; no path can leave the secrets folder."""
    resp = api.post(f"{api.url}/secrets", json={"name": name, "value": "x"})
    assert resp.status_code == 400 and resp.json()["field"] == "name", resp.text
    assert not (stack.secrets_dir.parent / "outside").exists()


def test_logs_of_a_function(cli, api, stack):
    """faas-cli logs prints the function's own log lines; --lines keeps the last ones; a
    followed log streams logs.Message JSON and lets go when its client leaves."""
    log = stack.logs / "runs.log"
    first = log.read_text().splitlines()[0]
    out = cli("logs", "runs", "--tail=false").stdout.splitlines()
    assert out[0].endswith(first) and len(out) == len(log.read_text().splitlines())
    assert len(cli("logs", "runs", "--tail=false", "--lines", "2").stdout.splitlines()) == 2
    params = {"name": "runs", "follow": "true", "tail": "1"}
    with api.get(f"{api.url}/logs", params=params, stream=True, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        message = json.loads(next(resp.iter_lines()))
    assert set(message) == {"name", "namespace", "instance", "timestamp", "text"}
    assert message["name"] == "runs" and message["text"] in log.read_text().splitlines()
    assert api.get(f"{api.url}/info", timeout=5).json()["provider"]["provider"] == "faas-ci-local"


def test_remove_then_deploy_again(cli, api, stack, gateway):
    """faas-cli remove stops the function and unlists it; deploy --filter brings it back."""
    pid = listed(api)["pipeline-log"]["pid"]
    assert "Removing old function" in cli("remove", "pipeline-log").stdout
    assert "pipeline-log" not in cli("list").stdout and not alive(pid)
    resp = requests.get(f"{stack.gateway_url}/function/pipeline-log/x", timeout=10)
    assert resp.status_code == 404 and resp.json()["field"] == "function"
    assert "Deployed" in cli("deploy", "-f", "stack.yml", "--filter", "pipeline-log").stdout
    assert wait_ready(api, ["pipeline-log"])["pipeline-log"]["pid"] != pid
    resp = gateway.call("pipeline-log", method="GET", path="20260101-000000-abcdef/unit/1")
    assert resp.status_code == 404 and resp.json()["error"].startswith("no log of unit attempt 1")


def test_a_changed_deployment_restarts_the_function_with_it(cli, api):
    """PUT with new environment and annotations restarts the process with them; faas-cli
    deploy of stack.yml puts the function back as it was."""
    before = listed(api)["runs"]
    deployment = {
        "service": "runs", "image": before["image"], "envProcess": before["envProcess"],
        "envVars": {**before["envVars"], "FAASCI_TEST_MARK": "changed"},
        "secrets": before["secrets"], "labels": before["labels"],
        "annotations": {"topic": "cron-function", "schedule": "0 4 * * *"},
    }  # fmt: skip
    assert api.put(f"{api.url}/functions", json=deployment).status_code == 202
    after = wait_ready(api, ["runs"])["runs"]
    assert after["pid"] != before["pid"] and not alive(before["pid"])
    assert after["envVars"]["FAASCI_TEST_MARK"] == "changed"
    assert after["annotations"]["schedule"] == "0 4 * * *"
    assert after["createdAt"] == before["createdAt"]
    environ = Path(f"/proc/{after['pid']}/environ").read_bytes().split(b"\0")
    assert b"FAASCI_TEST_MARK=changed" in environ
    cli("deploy", "-f", "stack.yml", "--filter", "runs")
    restored = wait_ready(api, ["runs"])["runs"]
    assert restored["pid"] != after["pid"] and "FAASCI_TEST_MARK" not in restored["envVars"]
    assert restored["annotations"] == before["annotations"]


def test_scale_to_zero_and_back(api, stack):
    """replicas 0 stops the process (and it stays stopped); 1 starts it again."""
    scale = f"{api.url}/scale-function/pipeline-log"
    pid = listed(api)["pipeline-log"]["pid"]
    assert api.post(scale, json={"serviceName": "pipeline-log", "replicas": 0}).status_code == 202
    time.sleep(1)  # longer than the supervisor's look at dead processes
    fn = listed(api)["pipeline-log"]
    assert fn["replicas"] == 0 and fn["availableReplicas"] == 0 and not alive(pid)
    resp = requests.get(f"{stack.gateway_url}/function/pipeline-log/x", timeout=10)
    assert resp.status_code == 502 and "scaled to zero" in resp.json()["error"]
    assert api.post(scale, json={"serviceName": "pipeline-log", "replicas": 3}).status_code == 202
    assert wait_ready(api, ["pipeline-log"])["pipeline-log"]["replicas"] == 1


@pytest.mark.parametrize(
    "method, route, body, status, field",
    [
        ("POST", "/functions", {"service": "not-in-stack"}, 400, "image"),
        ("PUT", "/functions", {"service": "not-in-stack", "image": "x/y:1"}, 404, "service"),
        ("POST", "/functions", {"service": "unit", "image": "x"}, 409, None),
        ("POST", "/functions", {"service": "Not_A_Name"}, 400, "service"),
        ("PUT", "/functions", {"service": "unit", "envVars": {"A": 1}}, 400, "envVars.A"),
        ("PUT", "/functions", {"service": "unit", "namespace": "dev"}, 400, "namespace"),
        ("PUT", "/functions", {"service": "unit", "secrets": ["no-such-secret"]}, 400, "secrets"),
        ("PUT", "/functions", {"service": "unit", "secrets": ["basic-auth-password"]}, 400,
         "secrets"),
        ("PUT", "/functions", [1, 2], 400, "body"),
        ("DELETE", "/functions", {}, 400, "functionName"),
        ("DELETE", "/functions", {"functionName": "no-such-fn"}, 404, "function"),
        ("GET", "/function/no-such-fn", None, 404, "function"),
        ("GET", "/functions?namespace=kube-system", None, 400, "namespace"),
        ("POST", "/scale-function/unit", {"serviceName": "unit", "replicas": -1}, 400, "replicas"),
        ("POST", "/scale-function/unit", {"serviceName": "lint", "replicas": 1}, 400,
         "serviceName"),
        ("GET", "/logs", None, 400, "name"),
        ("GET", "/logs?name=unit&tail=ten", None, 400, "tail"),
        ("GET", "/logs?name=unit&since=yesterday", None, 400, "since"),
        ("PATCH", "/functions", {}, 501, None),
        ("OPTIONS", "/functions", None, 501, None),
        ("GET", "/alertname", None, 501, None),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_errors(api, method, route, body, status, field):
    """Each bad or unsupported request gets its 4xx/501 JSON error; nothing restarts."""
    pids = {n: f["pid"] for n, f in listed(api).items()}
    resp = api.request(method, f"{api.url}{route}", json=body, timeout=10)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] and resp.json().get("field") == field, resp.text
    assert {n: f["pid"] for n, f in listed(api).items()} == pids


def test_info_and_namespaces(cli):
    """faas-cli version shows the provider; faas-cli namespace list its one namespace."""
    out = cli("version", check=False).stdout
    assert "faas-ci-local" in out and "processes" in out
    assert "openfaas-fn" in cli("namespace", "list").stdout


def test_builtin_scheduler_follows_deployments():
    """A deploy that changes annotations changes the schedules; unchanged ones keep their
    next time, a new one starts from now, a removed one is dropped."""
    clock = [datetime(2030, 1, 1, 1, 0, tzinfo=UTC)]
    scheduler = Scheduler({"webhook": "0 2 * * *", "gone": "0 3 * * *"}, None, lambda: clock[0])
    clock[0] += timedelta(minutes=30)
    followed = follow_schedules(scheduler, {"webhook": "0 2 * * *", "runs": "*/5 * * * *"})
    assert followed.next == {"webhook": datetime(2030, 1, 1, 2, 0, tzinfo=UTC),
                             "runs": datetime(2030, 1, 1, 1, 35, tzinfo=UTC)}  # fmt: skip
    assert follow_schedules(followed, dict(followed.schedules)) is followed


def test_a_killed_function_comes_back_after_the_deploys(api):
    """The supervisor still restarts a function that dies after all these deployments."""
    pid = listed(api)["runs"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (fn := listed(api)["runs"])["pid"] == pid or fn["availableReplicas"] != 1:
        assert time.monotonic() < deadline, "runs was not restarted"
        time.sleep(0.2)
