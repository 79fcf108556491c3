"""The python3-ci function server (template/python3-ci/index.py) with a test handler."""

import contextlib
import http.client
import importlib.util
import json
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
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
    """After a load, `function` and sys.path are as they were before."""
    path_before = list(sys.path)
    modules_before = function_modules()
    root = handler_package(tmp_path, "def handle(event, context):\n    return {'x': 1}\n")
    with loaded_index(root) as module:
        assert sys.modules["function.handler"] is module.handler
        assert module.app.test_client().get("/").get_json() == {"x": 1}
    assert sys.path == path_before
    assert function_modules() == modules_before
