"""One trace per run (faasci.tracing): the traceparent's round trip from the run record to
stage attempts, commands, and requests through faasci.invoke.Gateway."""

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from faasci import jsonlog, shell, tracing
from faasci.invoke import Gateway

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")  # sampled


@pytest.fixture(scope="module")
def exporter():
    """The process's tracer provider (set up as a function's is, unless an earlier test's
    span did), with an in-memory exporter beside it."""
    tracing.setup("test-tracing")
    memory = InMemorySpanExporter()
    tracing._provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture
def spans(exporter):
    """The spans ended during the test, by name."""
    exporter.clear()
    return lambda: {s.name: s for s in exporter.get_finished_spans()}


def a_run(**fields):
    """What tracing reads of a run record."""
    return SimpleNamespace(**{"id": "20261127-101010-abcdef", "service": "web", "ref": "main",
                              "commit": "c0ffee" * 6, "trigger": "http", "traceparent": None,
                              **fields})  # fmt: skip


def test_a_runs_traceparent_round_trips_to_its_stage_attempts(spans, tmp_path):
    """begin_run makes a root span; an attempt read from the record is its child, and the
    commands' spans the attempt's, all in the run's one trace."""
    run = a_run()
    run.traceparent = tracing.begin_run(run)
    trace_id, root_span_id = TRACEPARENT.match(run.traceparent).groups()
    assert tracing.trace_id_of(run.traceparent) == trace_id

    @tracing.attempt_scope
    def execute(stored_traceparent: str) -> dict:
        # As a retry's process would: only the stored record links it to the run.
        record = a_run(traceparent=stored_traceparent)
        tracing.begin_attempt(record, "unit", 2)
        assert jsonlog.bound() == {"run_id": record.id, "stage": "unit", "attempt": 2,
                                   "service": "web"}  # fmt: skip
        with open(tmp_path / "log", "wb") as log:
            shell.run_commands(["true", "exit 3"], shell.plain(tmp_path), dict(os.environ), 30,
                               log)  # fmt: skip
        return {"status": "failed", "reason": "exit"}

    assert execute(json.loads(json.dumps(run.traceparent)))["status"] == "failed"
    assert jsonlog.bound() == {}  # the attempt's log fields end with it
    ended = spans()
    root, attempt = ended["run web"], ended["unit attempt 2"]
    assert format(root.context.trace_id, "032x") == trace_id
    assert format(root.context.span_id, "016x") == root_span_id and root.parent is None
    assert root.attributes["faasci.run_id"] == run.id
    assert attempt.context.trace_id == root.context.trace_id
    assert attempt.parent.span_id == root.context.span_id
    assert attempt.attributes["faasci.stage"] == "unit"
    assert attempt.attributes["faasci.attempt"] == 2
    assert attempt.attributes["faasci.status"] == "failed"
    commands = [s for s in spans().values() if s.name == "command"]
    assert commands and all(s.parent.span_id == attempt.context.span_id for s in commands)


def test_an_exception_in_an_attempt_is_recorded_and_its_span_ended(spans):
    """An attempt that raises still ends its span, marked as an error."""

    @tracing.attempt_scope
    def execute():
        tracing.begin_attempt(a_run(traceparent=tracing.begin_run(a_run())), "lint", 1)
        raise RuntimeError("NATS went away")

    with pytest.raises(RuntimeError):
        execute()
    failed = spans()["lint attempt 1"]
    assert not failed.status.is_ok
    assert failed.events[0].name == "exception"


def test_a_new_run_is_a_new_trace_linked_to_its_caller(spans):
    """A run started inside another trace (a request, another run's stage) gets a trace of
    its own, linked to the caller's span."""
    with tracing.span("POST runs") as caller:
        traceparent = tracing.begin_run(a_run())
    assert tracing.trace_id_of(traceparent) != format(caller.get_span_context().trace_id, "032x")
    root = spans()["run web"]
    assert root.links[0].context.span_id == caller.get_span_context().span_id


def test_a_request_continues_the_callers_trace(spans):
    """The template's `request`: a child of the traceparent header's span; no span (no new
    trace) for a request without one."""
    caller = tracing.begin_run(a_run())
    trace_id, span_id = TRACEPARENT.match(caller).groups()
    with tracing.request({"Traceparent": caller}, "POST", "/"):
        assert tracing.current_traceparent().split("-")[1] == trace_id
    server = spans()[f"POST {tracing._service}"]  # named by this process's service
    assert format(server.parent.span_id, "016x") == span_id
    with tracing.request({"Content-Type": "application/json"}, "GET", "/runs"):
        assert tracing.current_traceparent() is None


class Recorder(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Recorder.seen.append((self.path, self.headers.get("traceparent")))
        self.send_response(202 if self.path.startswith("/async-function/") else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_gateway_calls_carry_the_current_traceparent(exporter):
    """Gateway.call and call_async send the current span's traceparent; none outside a span,
    and a caller's own header is kept."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.seen.clear()
    try:
        gw = Gateway(f"http://127.0.0.1:{server.server_port}", token="t")
        with tracing.span("stage") as current:
            gw.call("unit", {"run_id": "r"})
            gw.call_async("build", {"run_id": "r"}, call_id="r.build.1")
            mine = f"00-{'1' * 32}-{'2' * 16}-01"
            gw.call("lint", {}, headers={"traceparent": mine})
        gw.call("runs", {})
    finally:
        server.shutdown()
    found = current.get_span_context()
    ours = f"00-{found.trace_id:032x}-{found.span_id:016x}-{found.trace_flags:02x}"
    assert Recorder.seen == [("/function/unit", ours), ("/async-function/build", ours),
                             ("/function/lint", mine), ("/function/runs", None)]  # fmt: skip


def test_tracing_off_records_and_sends_nothing(tmp_path):
    """FAASCI_TRACING=off: no traceparent for a run, no header, no-op spans."""
    code = """
import json
from types import SimpleNamespace
from faasci import tracing
run = SimpleNamespace(id="r", service="web", ref="main", commit="c", trigger="cli")
with tracing.span("x") as s:
    out = {"traceparent": tracing.begin_run(run), "headers": tracing.inject({}),
           "recording": s.is_recording(), "current": tracing.current_traceparent()}
print(json.dumps(out))
"""
    env = {**os.environ, "FAASCI_TRACING": "off"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert json.loads(done.stdout) == {"traceparent": None, "headers": {}, "recording": False,
                                       "current": None}  # fmt: skip


def test_show_prints_the_trace_id_and_a_link_only_when_observing(monkeypatch, tmp_path):
    """`faasci show`'s trace line: the id always, Jaeger's link when the stack observes."""
    import dataclasses

    from faasci import cli
    from faasci.local.config import LocalConfig

    traceparent = f"00-{'a' * 32}-{'b' * 16}-01"
    cfg = LocalConfig(stack_file=tmp_path / "stack.yml", home=tmp_path, secrets_dir=tmp_path,
                      gateway_url="http://127.0.0.1:8080", nats_port=4222, s3_port=8333,
                      jaeger_ui_port=26686)  # fmt: skip
    monkeypatch.setattr(cli, "local_config", lambda: cfg)
    assert cli.trace_line({"traceparent": traceparent}) == f"trace: {'a' * 32}"
    assert cli.trace_line({"traceparent": None}) is None
    observing = dataclasses.replace(cfg, observe=True)
    monkeypatch.setattr(cli, "local_config", lambda: observing)
    assert cli.trace_line({"traceparent": traceparent}) == f"trace: {'a' * 32}"  # not running
    (tmp_path / "run").mkdir()  # a live process under Jaeger's pid file: it runs
    (tmp_path / "run" / "jaeger.pid").write_text(str(os.getpid()))
    assert cli.trace_line({"traceparent": traceparent}) == (
        f"trace: {'a' * 32}\n  http://127.0.0.1:26686/trace/{'a' * 32}"
    )
