"""faasci.local.cron: the scheduler with an injected clock, and the connector's request."""

import http.server
import socket
import threading
from datetime import UTC, datetime, timedelta

import pytest

from faasci.local import cron


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, at: datetime):
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock(at("2030-01-01T00:00:30"))


def test_nothing_is_due_before_its_time(clock):
    """A nightly schedule is not due at any time before 02:00."""
    scheduler = cron.Scheduler({"webhook": "0 2 * * *"}, invoke=None, now=clock)
    assert scheduler.due() == []
    clock.at = at("2030-01-01T01:59:59")
    assert scheduler.due() == []
    assert scheduler.next["webhook"] == at("2030-01-01T02:00:00")


def test_due_once_at_its_time_then_moves_on(clock):
    """At 02:00 it is due once; it is not due again until 02:00 the next day."""
    scheduler = cron.Scheduler({"webhook": "0 2 * * *"}, invoke=None, now=clock)
    clock.at = at("2030-01-01T02:00:00")
    assert scheduler.due() == ["webhook"]
    assert scheduler.due() == []
    assert scheduler.next["webhook"] == at("2030-01-02T02:00:00")
    for later in ("2030-01-01T02:00:59", "2030-01-01T12:00:00", "2030-01-02T01:59:59"):
        clock.at = at(later)
        assert scheduler.due() == [], later
    clock.at = at("2030-01-02T02:00:00")
    assert scheduler.due() == ["webhook"]


def test_a_late_check_fires_once_not_once_per_missed_time(clock):
    """After a long pause a missed schedule fires once and moves past now."""
    scheduler = cron.Scheduler({"every5": "*/5 * * * *"}, invoke=None, now=clock)
    clock.at = at("2030-01-01T01:02:00")  # a dozen 5-minute marks were missed
    assert scheduler.due() == ["every5"]
    assert scheduler.due() == []
    assert scheduler.next["every5"] == at("2030-01-01T01:05:00")


def test_each_schedule_keeps_its_own_time(clock):
    """Two functions with different schedules fire independently."""
    scheduler = cron.Scheduler(
        {"hourly": "0 * * * *", "quarter": "*/15 * * * *"}, invoke=None, now=clock
    )
    clock.at = at("2030-01-01T00:15:00")
    assert scheduler.due() == ["quarter"]
    clock.at = at("2030-01-01T01:00:00")
    assert sorted(scheduler.due()) == ["hourly", "quarter"]
    assert scheduler.due() == []


def test_run_invokes_due_functions_until_stopped(clock):
    """run() calls invoke(name) for a due function and returns once stop is set."""
    called = threading.Event()
    names = []

    def invoke(name):
        names.append(name)
        called.set()

    scheduler = cron.Scheduler({"webhook": "0 2 * * *"}, invoke=invoke, now=clock)
    clock.at = at("2030-01-01T02:00:00")
    stop = threading.Event()
    worker = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    worker.start()
    try:
        assert called.wait(5), "the due function was never invoked"
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    assert names == ["webhook"]


@pytest.fixture
def gateway(monkeypatch):
    """A tiny HTTP server recording the requests it gets, answering 202."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, dict(self.headers), self.rfile.read(length)))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_invoke_through_gateway_sends_what_cron_connector_sends(gateway):
    """POST /function/<name>, empty body, X-Topic and X-Connector headers; returns the status."""
    url, seen = gateway
    assert cron.invoke_through_gateway(url, "webhook") == 202
    [(method, path, headers, body)] = seen
    assert (method, path, body) == ("POST", "/function/webhook", b"")
    assert headers["X-Topic"] == "cron-function"
    assert headers["X-Connector"] == "cron-connector"


def test_invoke_through_gateway_returns_none_when_unreachable(monkeypatch):
    """A gateway that refuses connections gives None, not an exception."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cron.invoke_through_gateway(f"http://127.0.0.1:{port}", "webhook") is None


def test_schedule_times_are_aware_utc(clock):
    """Next times are timezone-aware, comparable with the aware clock."""
    scheduler = cron.Scheduler({"webhook": "0 2 * * *"}, invoke=None, now=clock)
    nxt = scheduler.next["webhook"]
    assert nxt.tzinfo is not None
    assert nxt - clock.at == timedelta(hours=1, minutes=59, seconds=30)
