"""The python3-ci function server (template/python3-ci/index.py) with a test handler."""

import contextlib
import gc
import http.client
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from oidc_issuer import Issuer
from waitress.server import create_server

from faasci import api
from faasci.errors import UserError

INDEX = Path(__file__).resolve().parents[2] / "template" / "python3-ci" / "index.py"
SECRET = "s3cr3t-database-password-in-the-message"

# A handler package named `function`, as the template's Dockerfile lays it out.
HANDLER = textwrap.dedent(
    f"""
    from faasci.api import endpoint, json_body
    from faasci.errors import Unprocessable


    @endpoint
    def _json_echo(event, context):
        return {{"got": json_body(event)}}


    @endpoint
    def _user_error(event, context):
        raise Unprocessable("pipeline file is broken", field="stages.unit.timeout")


    def handle(event, context):
        path = event.path
        if path == "/custom":
            return {{
                "statusCode": 201,
                "body": "created",
                "headers": {{"X-Run-Id": "20300101-000000-abcdef", "Content-Type": "text/plain"}},
            }}
        if path == "/custom-json":
            return {{"statusCode": 202, "body": {{"queued": True}}, "headers": {{"X-A": "b"}}}}
        if path == "/plain":
            return {{"message": "hi", "method": event.method, "query": event.query.get("q")}}
        if path == "/list":
            return [1, 2, 3]
        if path == "/size":
            return {{"bytes": len(event.body)}}
        if path == "/boom":
            raise RuntimeError("{SECRET}")
        if path == "/json":
            return _json_echo(event, context)
        if path == "/user-error":
            return _user_error(event, context)
        return {{"statusCode": 404, "body": {{"error": "no such path"}}}}
    """
)


def function_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "function" or k.startswith("function.")}


@contextlib.contextmanager
def loaded_index(root: Path):
    """index.py imported under a unique name with `root` first on sys.path; undone after."""
    saved = function_modules()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    module_name = f"faasci_template_index_{uuid.uuid4().hex}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, INDEX)
        index = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = index  # Flask finds its root path through sys.modules
        spec.loader.exec_module(index)
        yield index
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(module_name, None)
        for name in function_modules():
            del sys.modules[name]
        sys.modules.update(saved)


def handler_package(root: Path, source: str) -> Path:
    (root / "function").mkdir()
    (root / "function" / "__init__.py").write_text("")
    (root / "function" / "handler.py").write_text(source)
    return root


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """index.py serving the test handler package."""
    root = handler_package(tmp_path_factory.mktemp("fn"), HANDLER)
    with loaded_index(root) as module:
        assert Path(module.handler.__file__).resolve() == (root / "function" / "handler.py")
        yield module


@pytest.fixture
def client(index):
    """A Flask test client of the function server."""
    return index.app.test_client()


@pytest.mark.parametrize("path", ["/_/health", "/_/ready"])
def test_health_and_ready_answer_200(client, path):
    """The platform's probes get 200 with a JSON status."""
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok"}


def test_status_body_and_headers_become_the_response(client):
    """A dict with statusCode, body and headers is that response."""
    resp = client.post("/custom", data=b"{}")
    assert resp.status_code == 201
    assert resp.get_data(as_text=True) == "created"
    assert resp.headers["X-Run-Id"] == "20300101-000000-abcdef"
    assert resp.headers["Content-Type"] == "text/plain"


def test_a_dict_body_with_a_status_is_json(client):
    """A dict body under statusCode is sent as JSON with the given status and headers."""
    resp = client.get("/custom-json")
    assert resp.status_code == 202
    assert resp.mimetype == "application/json"
    assert resp.get_json() == {"queued": True}
    assert resp.headers["X-A"] == "b"


def test_a_plain_dict_is_200_json(client):
    """A plain dict is a 200 JSON response; the event carries method and query."""
    resp = client.put("/plain?q=search")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    assert resp.get_json() == {"message": "hi", "method": "PUT", "query": "search"}


def test_a_list_is_200_json(client):
    """A list is a 200 JSON response too."""
    resp = client.get("/list")
    assert resp.status_code == 200
    assert resp.get_json() == [1, 2, 3]


def test_a_body_at_the_limit_is_accepted(client):
    """A body of exactly 256,000 bytes reaches the handler."""
    resp = client.post("/size", data=b"x" * 256_000)
    assert resp.status_code == 200
    assert resp.get_json() == {"bytes": 256_000}


def test_a_body_over_the_limit_is_413_json(client):
    """A body over 256,000 bytes is a 413 whose JSON body names the problem."""
    resp = client.post("/size", data=b"x" * 256_001)
    assert resp.status_code == 413
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["field"] == "body"
    assert "256000" in body["error"]


def test_a_handler_exception_is_500_without_internals(client):
    """An exception is a JSON 500 naming only its type: no message, no traceback."""
    resp = client.post("/boom", data=b"{}")
    assert resp.status_code == 500
    assert resp.mimetype == "application/json"
    assert resp.get_json() == {"error": "internal error: RuntimeError"}
    text = resp.get_data(as_text=True)
    assert SECRET not in text
    assert "Traceback" not in text
    assert "handler.py" not in text


def test_an_unknown_method_is_a_json_error(client):
    """A method the routes do not take is a JSON 405, not an HTML page."""
    resp = client.open("/plain", method="TRACE")
    assert resp.status_code == 405
    assert resp.mimetype == "application/json"
    assert "error" in resp.get_json()


def test_a_chunked_body_over_the_limit_is_413_through_waitress(index):
    """Served by waitress, a chunked body with no Content-Length is capped too."""
    server = create_server(index.app, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def chunks(total: int):
        for _ in range(total // 10_000):
            yield b"x" * 10_000

    try:
        statuses = {}
        for total in (250_000, 300_000):
            conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=30)
            conn.request("POST", "/size", body=chunks(total), encode_chunked=True)
            resp = conn.getresponse()
            statuses[total] = (resp.status, json.loads(resp.read()))
            conn.close()
    finally:
        server.close()
        thread.join(5)
    assert statuses[250_000] == (200, {"bytes": 250_000})
    assert statuses[300_000][0] == 413
    assert statuses[300_000][1]["field"] == "body"


def test_endpoint_turns_a_user_error_into_its_4xx_body(client):
    """A UserError raised in an `endpoint` handler is its status with a JSON body."""
    resp = client.post("/user-error", data=b"{}")
    assert resp.status_code == 422
    assert resp.get_json() == {
        "error": "pipeline file is broken",
        "field": "stages.unit.timeout",
    }


def test_json_body_round_trips_an_object(client):
    """json_body passes a JSON object to the handler."""
    resp = client.post("/json", data=json.dumps({"repo": "/src/app", "ref": "main"}))
    assert resp.status_code == 200
    assert resp.get_json() == {"got": {"repo": "/src/app", "ref": "main"}}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"repo": ', "not valid JSON"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b"", "empty"),
        (b"   \n", "empty"),
        (b'["a list"]', "JSON object"),
    ],
)
def test_json_body_refuses_bad_bodies_naming_body(client, data, words):
    """Malformed, empty or non-object bodies are a 400 naming `body`."""
    resp = client.post("/json", data=data)
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["field"] == "body"
    assert words in body["error"]


class Event:
    """The parts of the template's Event that faasci.api reads."""

    def __init__(self, body=b"", headers=None):
        self.body = body
        self.headers = headers or {}


def test_endpoint_without_the_server():
    """endpoint wraps plain results as 200, passes statusCode dicts, maps UserError."""

    @api.endpoint
    def ok(event, context):
        return {"a": 1}

    @api.endpoint
    def custom(event, context):
        return {"statusCode": 204, "body": None}

    @api.endpoint
    def bad(event, context):
        raise UserError("ref must be a non-empty string", field="ref")

    @api.endpoint
    def crash(event, context):
        raise ValueError("not a user error")

    assert ok(Event(), None) == {"statusCode": 200, "body": {"a": 1}}
    assert custom(Event(), None) == {"statusCode": 204, "body": None}
    assert bad(Event(), None) == {
        "statusCode": 400,
        "body": {"error": "ref must be a non-empty string", "field": "ref"},
    }
    with pytest.raises(ValueError):
        crash(Event(), None)


@pytest.mark.parametrize("path", ["/json", "/plain", "/size", "/nowhere/at/all"])
def test_deep_nesting_is_400_before_any_handler(client, path):
    """100,000 nested arrays or objects: 400 naming body, whatever the handler does with a
    body (parses it, ignores it, or has no such path); 64 levels reach the handler."""
    for data in (b"[" * 100_000, b' {"a":' * 40_000, b"[" * 65 + b"]" * 65):
        resp = client.post(path, data=data)
        assert resp.status_code == 400, resp.get_data()
        assert resp.get_json()["field"] == "body" and "deeper than 64" in resp.get_json()["error"]
    resp = client.post(path, data=b"[" * 64 + b"]" * 64)
    assert resp.status_code != 400 or "deeper" not in resp.get_json()["error"]


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"{}", 1), (b'{"a": [1, {"b": []}]}', 4), (b'"[[[["', 0), (b'{"a\\"[[": 1}', 1),
        (b'["]]]]", [[]]]', 3), (b"", 0), (b"not json [[", 2), (b'"unterminated [[[', 0),
    ],
)  # fmt: skip
def test_json_depth_ignores_brackets_in_strings(text, depth):
    assert api.json_depth(text) == depth


def reference_depth(text: bytes) -> int:
    """json_depth's meaning, one character at a time: brackets outside strings, +1 opening
    and -1 closing, the deepest running total (0 with none). A string ends at its closing
    quote, at the end, or before a backslash that escapes nothing (a newline or the end)."""
    s, i, depth, deepest = text.decode("latin-1"), 0, 0, 0
    while i < len(s):
        c, i = s[i], i + 1
        if c == '"':
            while i < len(s) and s[i] != '"':
                if s[i] == "\\" and (i + 1 == len(s) or s[i + 1] == "\n"):
                    break
                i += 2 if s[i] == "\\" else 1
            else:
                i += 1  # the closing quote
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def test_json_depth_agrees_with_a_character_by_character_count(index):
    """The template's and the library's json_depth equal the plain count above on 3,000
    random texts of quotes, backslashes, newlines and brackets, and on real JSON."""
    rng = random.Random(7)
    texts = ["[" + "".join(rng.choice('[]{}"\\\na ') for _ in range(rng.randrange(60)))
             for _ in range(3000)]  # fmt: skip
    texts += [json.dumps({"seen": {"record": json.dumps({"a": [{"b": '"[{'}] * 9})}}),
              json.dumps([[{"x": "\\]]"}, ["\\\""]]])]  # fmt: skip
    for text in texts:
        data = text.encode()
        assert api.json_depth(data) == index.json_depth(data) == reference_depth(data), text


def test_json_body_refuses_deep_nesting_without_recursion():
    """json_body alone (no template in front) also refuses deep nesting with a 400."""
    for data in (b"[" * 100_000, b'{"a":' * 50_000, b'{"a":' * 65 + b"1" + b"}" * 65):
        with pytest.raises(UserError) as caught:
            api.json_body(Event(data))
        assert caught.value.status == 400 and caught.value.field == "body"
        assert "deeper than 64" in caught.value.message
    nested = b'{"a":' * 63 + b"{}" + b"}" * 63
    assert api.json_body(Event(nested))["a"]


def test_json_body_on_malformed_json_names_body():
    """faasci.api.json_body raises a 400 UserError naming `body`."""
    with pytest.raises(UserError) as caught:
        api.json_body(Event(b"{not json"))
    assert caught.value.status == 400
    assert caught.value.field == "body"
    assert api.json_body(Event(b'{"run_id": "x"}')) == {"run_id": "x"}


def test_is_cron_recognises_cron_connector():
    """Only a request with X-Connector: cron-connector is a cron request."""
    assert api.is_cron(Event(headers={"X-Connector": "cron-connector"}))
    assert not api.is_cron(Event(headers={"X-Connector": "other"}))
    assert not api.is_cron(Event())


def test_loading_index_leaves_no_function_module_behind(tmp_path):
    """After a load, `function` and sys.path are as they were before, and the garbage
    collector (paused while it loads) collects again, what loaded frozen."""
    path_before = list(sys.path)
    modules_before = function_modules()
    frozen_before = gc.get_freeze_count()
    root = handler_package(tmp_path, "def handle(event, context):\n    return {'x': 1}\n")
    with loaded_index(root) as module:
        assert sys.modules["function.handler"] is module.handler
        assert module.app.test_client().get("/").get_json() == {"x": 1}
        assert gc.isenabled() and gc.get_freeze_count() > frozen_before
    assert sys.path == path_before
    assert function_modules() == modules_before


# The server as a process, as of-watchdog (fprocess) or the local stack runs it.

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"

SLOW_HANDLER = textwrap.dedent(
    """
    import time
    from pathlib import Path


    def handle(event, context):
        if event.path == "/slow":
            Path(event.query["started"]).touch()
            time.sleep(float(event.query["s"]))
            return {"slept": float(event.query["s"])}
        return {"ok": True}
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def index_process(root: Path, handler: str | Path, **env: str):
    """index.py started as `python index.py` in `root` (a copy, with function/ beside it, as
    the image and the local stack lay it out); yields (process, base URL, log file)."""
    shutil.copy(INDEX, root / "index.py")
    if isinstance(handler, Path):
        (root / "function").symlink_to(handler, target_is_directory=True)
    else:
        handler_package(root, handler)
    port = free_port()
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "index.py"], cwd=root, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "UPSTREAM_PORT": str(port), "BIND_ADDRESS": "127.0.0.1", **env},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{url}/_/health", timeout=1)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "index.py did not start"
                time.sleep(0.05)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigterm_lets_requests_in_flight_finish_then_exits(tmp_path):
    """SIGTERM during a 4 s request: /_/ready turns 503 at once, new requests are still
    served, the request ends with 200, and the process exits 0 by itself about 1 s later."""
    started = tmp_path / "started"
    with index_process(tmp_path, SLOW_HANDLER) as (proc, url, log):
        slow = {}

        def call():
            resp = requests.get(f"{url}/slow", params={"s": 4, "started": started}, timeout=30)
            slow.update(status=resp.status_code, body=resp.json(), at=time.monotonic())

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 10
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert requests.get(f"{url}/_/ready", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = requests.get(f"{url}/_/ready", timeout=5)
        assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
        assert requests.get(f"{url}/_/health", timeout=5).status_code == 200  # alive
        assert requests.get(f"{url}/other", timeout=5).json() == {"ok": True}  # still served
        assert proc.poll() is None
        thread.join(30)
        assert slow["status"] == 200 and slow["body"] == {"slept": 4.0}
        code = proc.wait(10)
        exited_after = time.monotonic() - slow["at"]
    assert code == 0, log.read_text()
    assert 0.5 <= exited_after < 3, exited_after
    assert "drained; exiting" in log.read_text()


def test_drain_timeout_ends_a_request_that_does_not(tmp_path):
    """DRAIN_TIMEOUT (a Go duration) bounds the drain: a 30 s request does not hold it."""
    started = tmp_path / "started"
    with index_process(tmp_path, SLOW_HANDLER, DRAIN_TIMEOUT="1500ms") as (proc, url, log):

        def call():
            with contextlib.suppress(requests.RequestException):  # cut off: no answer
                requests.get(f"{url}/slow", params={"s": 30, "started": started}, timeout=60)

        threading.Thread(target=call, daemon=True).start()
        deadline = time.monotonic() + 10
        while not started.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        took = time.monotonic() - signalled
    assert code == 0
    assert 1.4 <= took < 4, took
    assert "drain timeout: exiting with 1 requests in flight" in log.read_text()


def test_a_bad_duration_stops_the_start(tmp_path):
    """A DRAIN_TIMEOUT that is no duration is refused when the server starts, not at SIGTERM."""
    shutil.copy(INDEX, tmp_path / "index.py")
    handler_package(tmp_path, SLOW_HANDLER)
    env = {**os.environ, "DRAIN_TIMEOUT": "soon"}
    done = subprocess.run([sys.executable, "index.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode != 0
    assert "not a duration: 'soon'" in done.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [("30s", 30), ("5m", 300), ("1m30s", 90), ("250ms", 0.25), ("1h", 3600), ("45", 45)],
)
def test_durations_read_as_the_watchdog_reads_them(index, text, value):
    """write_timeout, healthcheck_interval and DRAIN_TIMEOUT take Go durations or seconds."""
    assert index.seconds(text) == pytest.approx(value)


def secrets_dir(root: Path, *names: str) -> Path:
    folder = root / "secrets"
    folder.mkdir()
    for name in names:
        (folder / name).write_text("value\n")
    return folder


def unreachable_services(root: Path, secrets: Path) -> dict[str, str]:
    """A function's environment whose NATS and S3 ports are closed."""
    return {
        "NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "FAASCI_SECRETS_DIR": str(secrets),
        "FAASCI_WORKDIR": str(root / "work"),
        "GATEWAY_URL": f"http://127.0.0.1:{free_port()}",
    }


def test_ready_is_503_naming_nats_url_when_nats_is_unreachable(tmp_path):
    """The runs function with NATS on a closed port: /_/ready is 503 naming NATS_URL within
    5 s, /_/health stays 200, and the reconnect loop logs one warning, no tracebacks."""
    fn = tmp_path / "fn"
    fn.mkdir()
    env = unreachable_services(tmp_path, secrets_dir(tmp_path, "s3-access-key", "s3-secret-key"))
    with index_process(fn, FUNCTIONS / "runs", **env) as (proc, url, log):
        began = time.monotonic()
        resp = requests.get(f"{url}/_/ready", timeout=10)
        took = time.monotonic() - began
        assert resp.status_code == 503 and took < 5, took
        body = resp.json()
        assert body["status"] == "unavailable" and body["setting"] == "NATS_URL"
        assert env["NATS_URL"] in body["error"]
        assert requests.get(f"{url}/_/health", timeout=5).status_code == 200
        for _ in range(4):  # probes go on while nats-py keeps trying to connect
            assert requests.get(f"{url}/_/ready", timeout=5).status_code == 503
            time.sleep(1)
        text = log.read_text()
    assert "Traceback" not in text, text
    assert text.count('"logger": "faasci.bus", "message": "NATS at') == 1, text  # changes only
    assert text.count("not ready:") == 1, text


def test_ready_is_503_naming_a_missing_secret(tmp_path):
    """Without the s3-secret-key secret file, /_/ready is 503 naming that secret."""
    fn = tmp_path / "fn"
    fn.mkdir()
    env = unreachable_services(tmp_path, secrets_dir(tmp_path, "s3-access-key"))
    with index_process(fn, FUNCTIONS / "pipeline-log", **env) as (proc, url, log):
        resp = requests.get(f"{url}/_/ready", timeout=10)
    assert resp.status_code == 503
    assert resp.json()["setting"] == "s3-secret-key"
    assert "secret s3-secret-key is not mounted" in resp.json()["error"]


def test_calls_needing_nats_are_503_naming_nats_url_when_it_is_unreachable(tmp_path):
    """A stage hand-off and a runs listing with NATS down: 503 naming NATS_URL within
    seconds, not a 500 after minutes of retries."""
    env = unreachable_services(tmp_path, secrets_dir(tmp_path, "s3-access-key", "s3-secret-key"))
    issuer = Issuer()  # the caller is a person with a good token: only NATS is missing
    env["OIDC_ISSUER"] = issuer.url
    bearer = {"Authorization": f"Bearer {issuer.token()}"}
    answers = {}
    for name, method, body in [
        ("unit", "POST", {"run_id": "20300101-000000-abcdef", "attempt": 1}),
        ("runs", "GET", None),
    ]:
        (tmp_path / name).mkdir()
        with index_process(tmp_path / name, FUNCTIONS / name, **env) as (proc, url, log):
            began = time.monotonic()
            resp = requests.request(method, f"{url}/", json=body, headers=bearer, timeout=60)
            answers[name] = (resp.status_code, resp.json(), time.monotonic() - began)
            again = time.monotonic()
            again_resp = requests.request(method, f"{url}/", json=body, headers=bearer, timeout=60)
            assert again_resp.status_code == 503
            assert time.monotonic() - again < 1  # known to be down: no waiting again
    for name, (status, body, took) in answers.items():
        assert status == 503, (name, body)
        assert body == {
            "error": f"NATS at {env['NATS_URL']} (NATS_URL) is unreachable",
            "setting": "NATS_URL",
        }
        assert took < 10, (name, took)
