"""The local queue-worker on a real NATS server: a function that is busy (429, of-watchdog's
max_inflight) or unreachable gets the request again; its final answer reaches the callback."""

import asyncio
import http.server
import threading
import time

import pytest

from faasci.local import queue


@pytest.fixture
def callback_url():
    """A local receiver of callbacks; yields (url, list of (headers, body))."""
    got = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", got
    server.shutdown()


def test_busy_and_unreachable_functions_get_the_request_again(nats_bus, callback_url):
    """429, then a refused connection, then 200: three deliveries, one callback with 200."""
    url, got = callback_url
    answers = [(429, {}, b"busy"), ConnectionError("down"), (200, {}, b"done")]
    calls = []

    def invoke(function, path, method, query, headers, body):
        calls.append((function, body, headers["X-Call-Id"]))
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    nats_bus.call(queue.ensure_queue, nats_bus)
    message = queue.request_message("unit", "", "POST", "", {}, b'{"run_id": "r"}', "call-1", url)
    nats_bus.call(queue.enqueue, nats_bus, message)
    worker = queue.QueueWorker(nats_bus, invoke, concurrency=2)
    asyncio.run_coroutine_threadsafe(worker.run(), nats_bus.loop)

    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(got) == 1, calls
    headers, body = got[0]
    assert headers["X-Function-Status"] == "200" and body == b"done"
    assert headers["X-Call-Id"] == "call-1"
    assert calls == [("unit", b'{"run_id": "r"}', "call-1")] * 3
