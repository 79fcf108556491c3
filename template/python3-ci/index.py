"""The function server every faas-ci function runs: Flask served by waitress.

As in OpenFaaS's python3-http template, it listens on an upstream port (UPSTREAM_PORT,
else PORT, else 5000) behind of-watchdog (`mode=http`), which serves 8080, enforces the
timeouts and answers /_/health from its lock file; run directly (PORT=...), it serves
/_/health itself. The handler is `function/handler.py`'s `handle(event, context)`; a dict
it returns with `statusCode`, `body` and `headers` becomes the response, a dict or list
body as JSON. Errors are JSON bodies too.

/_/ready (the watchdog's `ready_path`) answers 503 while draining, and otherwise asks the
handler's `ready()` when it has one (a module function, or an attribute of `handle`),
which returns (ok, JSON body).

SIGTERM drains: of-watchdog passes it on at once but keeps accepting requests for its
`healthcheck_interval`, so the server keeps serving, lets every request in flight finish,
and exits once nothing has been in flight for QUIET_S (and the watchdog has stopped
accepting), or at DRAIN_TIMEOUT (default: healthcheck_interval + write_timeout + 5 s;
0: exit at once).
"""

# ruff: noqa: E402 (the imports below load with the cyclic garbage collector paused)
import gc

# No cyclic collection while the server and its handler load: their imports make a great
# many objects and no garbage, and the collections they set off cost a cold start ~50 ms
# (a fifth). Once loaded, it is all frozen (later collections never scan it) and
# collection resumes.
gc.disable()

import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from waitress import serve
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import ClosingIterator

from function import handler

try:  # a request's traceparent continues its trace (OpenTelemetry, faasci.tracing)
    from faasci import tracing
except ImportError:  # a handler without the faasci library
    tracing = None

gc.freeze()
gc.enable()

MAX_BODY_BYTES = 256_000  # the OpenFaaS queue-worker's cap, enforced for every invocation
MAX_JSON_DEPTH = 64  # arrays and objects inside one another, in any JSON body
QUIET_S = 1.0  # draining ends after this long with no request in flight
# A JSON string (or the unterminated rest of one), its loop unrolled so that runs of plain
# characters match in one step: ten times faster on a hand-off's record than an alternation.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?')
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
log = logging.getLogger("function")
readiness = getattr(handler, "ready", None) or getattr(handler.handle, "ready", None)


def seconds(value: str) -> float:
    """A Go duration as the watchdog reads it ("30s", "5m", "1m30s", "250ms") or seconds."""
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    unit = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


class Drain:
    """Requests in flight (the platform's /_/ probes aside) and the drain after SIGTERM.
    Waitress has no graceful stop: once drained, the process ends itself."""

    def __init__(self, wsgi_app, env=os.environ):
        self.wsgi_app = wsgi_app
        self.lock = threading.Lock()
        self.in_flight = 0
        self.last_busy = 0.0
        self.draining = False
        # Read now, so a bad value stops the start rather than the drain. While of-watchdog
        # still accepts requests (its healthcheck_interval), they keep coming: serve them.
        self.linger = seconds(env.get("healthcheck_interval") or "0")
        # The longest a request that arrives while lingering may take, with a margin.
        longest = self.linger + seconds(env.get("write_timeout") or "10s")
        self.deadline = seconds(env.get("DRAIN_TIMEOUT") or str(longest + 5))

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/_/"):
            return self.wsgi_app(environ, start_response)
        with self.lock:
            self.in_flight += 1
        try:  # done once the body is sent (waitress closes the iterable), or on an error
            return ClosingIterator(self.wsgi_app(environ, start_response), self.done)
        except BaseException:
            self.done()
            raise

    def done(self):
        with self.lock:
            self.in_flight -= 1
            self.last_busy = time.monotonic()

    def start(self, signum=None, frame=None):
        """The SIGTERM handler: only flags and starts the drain (no logging in a handler)."""
        if not self.draining:
            self.draining = True
            threading.Thread(target=self.wait_then_exit, daemon=True).start()

    def wait_then_exit(self):
        try:
            began = time.monotonic()
            log.info("SIGTERM: draining %d requests in flight", self.in_flight)
            while time.monotonic() - began < self.deadline:
                with self.lock:
                    now = time.monotonic()
                    quiet = now - max(began, self.last_busy) >= QUIET_S
                    if not self.in_flight and quiet and now - began >= self.linger:
                        break
                time.sleep(0.1)
            else:
                log.warning("drain timeout: exiting with %d requests in flight", self.in_flight)
            log.info("drained; exiting")
            if tracing is not None:
                tracing.flush()  # the spans still batched
            logging.shutdown()  # flushes the log handlers
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # exit even when the output is gone (the watchdog may have exited first)
            os._exit(0)


drain = app.wsgi_app = Drain(app.wsgi_app)


class Event:
    def __init__(self):
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    def __init__(self):
        self.hostname = os.getenv("HOSTNAME", socket.gethostname())


def json_response(status: int, body, headers=None) -> Response:
    resp = Response(json.dumps(body), status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def format_response(result) -> Response:
    if result is None:
        return Response("", status=200)
    if not isinstance(result, dict) or "statusCode" not in result:
        return (
            json_response(200, result)
            if isinstance(result, (dict, list))
            else Response(str(result))
        )
    status, body, headers = result["statusCode"], result.get("body"), result.get("headers") or {}
    if isinstance(body, (dict, list)):
        return json_response(status, body, headers)
    resp = Response("" if body is None else body, status=status)
    for name, value in headers.items():
        resp.headers[name] = value
    return resp


@app.route("/_/health")
def health():
    return json_response(200, {"status": "ok"})  # alive; whether it can work is /_/ready


@app.route("/_/ready")
def ready():
    if drain.draining:
        return json_response(503, {"status": "draining"})
    if readiness is None:
        return json_response(200, {"status": "ok"})
    ok, body = readiness()
    return json_response(200 if ok else 503, body)


@app.route("/_/metrics")
def prometheus_metrics():
    """This process's Prometheus metrics (one process, one registry: faasci.metrics), for the
    platform's Prometheus, which scrapes this port directly (stack.yml's prometheus.io.*
    annotations). Through the gateway, which always sets X-Call-Id, it is not found: a
    function's metrics name services and are no one else's to read."""
    if request.headers.get("X-Call-Id"):
        return json_response(404, {"error": f"no route {request.path}", "field": "path"})
    return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)


@app.route("/", defaults={"path": ""}, methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
@app.route("/<path:path>", methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
def call_handler(path):
    if json_depth(request.get_data()) > MAX_JSON_DEPTH:  # before any handler parses it
        return json_response(400, {"error": "request body nests arrays/objects deeper than "
                                   f"{MAX_JSON_DEPTH}", "field": "body"})  # fmt: skip
    if tracing is None:
        return format_response(handler.handle(Event(), Context()))
    with tracing.request(request.headers, request.method, request.path):
        return format_response(handler.handle(Event(), Context()))


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a body that looks like JSON (0 otherwise),
    counted without parsing (no recursion); brackets inside strings do not count."""
    if body.lstrip()[:1] not in (b"[", b"{"):
        return 0
    brackets = JSON_STRING.sub(b"", body).translate(None, NOT_BRACKETS)
    return max(itertools.accumulate(1 if c in b"[{" else -1 for c in brackets))


@app.errorhandler(HTTPException)
def http_error(e: HTTPException):
    if e.code == 413:
        return json_response(
            413, {"error": f"request body is over {MAX_BODY_BYTES} bytes", "field": "body"}
        )
    return json_response(e.code or 500, {"error": e.description})


@app.errorhandler(Exception)
def unexpected_error(e: Exception):
    # The traceback goes to the function's log; the caller gets no internals.
    log.exception("unhandled error in %s %s", request.method, request.path)
    return json_response(500, {"error": f"internal error: {type(e).__name__}"})


if __name__ == "__main__":
    if tracing is None:  # a handler without the faasci library: plain lines
        logging.basicConfig(
            stream=sys.stderr,
            level=os.getenv("LOG_LEVEL", "INFO"),
            format="%(asctime)s %(levelname)s %(name)s: %(message).2000s",
        )
        try:  # faasci without its tracing's libraries: its secrets masked all the same
            from faasci.masking import install_filter
        except ImportError:
            pass
        else:
            install_filter()
    else:  # JSON lines (faasci.jsonlog), the platform's and running stages' secrets masked
        from faasci import jsonlog

        jsonlog.configure()
        tracing.setup()  # service.name: this function's (FAASCI_FUNCTION)
    signal.signal(signal.SIGTERM, drain.start)
    serve(
        app,
        host=os.getenv("BIND_ADDRESS", "127.0.0.1"),
        port=int(os.getenv("UPSTREAM_PORT") or os.getenv("PORT") or "5000"),
        threads=int(os.getenv("THREADS", "8")),
        ident="faasci",
        # A streamed answer (a log) waits for its reader past 1 MiB instead of buffering
        # waitress's default 16 MiB, which fragmented the heap: memory grew with each one.
        outbuf_high_watermark=1 << 20,
    )
