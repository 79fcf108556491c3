"""The local gateway: OpenFaaS's HTTP contract in front of the provider's processes.

  /function/<name>[.openfaas-fn][/<path>]        synchronous invocation
  /async-function/<name>[.openfaas-fn][/<path>]  202 Accepted; queued on JetStream (queue.py)
  /system/...                                    OpenFaaS's REST API, basic auth (openfaas_api.py)
  /healthz

Invocations and /healthz are open, as in OpenFaaS. The built-in cron scheduler follows the
deployed functions' annotations; FAASCI_BUILTIN_CRON=0 leaves schedules to cron-connector.

Run as `python -m faasci.local.gateway` (faasci up does that).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
import time
import uuid
from urllib.parse import urlparse

from flask import Flask, Response, jsonify, request
from waitress import serve

from .. import metrics
from .. import stack as stack_file
from ..bus import Bus
from ..errors import NotFound, UserError
from . import openfaas_api, queue
from .config import LocalConfig
from .control import client_settings
from .cron import Scheduler, invoke_through_gateway
from .provider import DRAIN_S, HOP_HEADERS, Provider

log = logging.getLogger("faasci.gateway")

ASYNC_MAX_BYTES = 256_000
SYNC_MAX_BYTES = 16 * 1024 * 1024
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def error(status: int, message: str, field: str | None = None) -> Response:
    body = {"error": message}
    if field:
        body["field"] = field
    resp = jsonify(body)
    resp.status_code = status
    return resp


def callback_allowed(url: str, allowed: list[str]) -> bool:
    """Is `url` under one of the `allowed` URL prefixes? Compared in a normal form (scheme,
    host and port, path), refusing user names, dot segments and escapes in the path, so a
    URL cannot look allowed and go elsewhere."""
    try:
        parsed = urlparse(url)
        port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    except ValueError:  # a port that is not a number
        return False
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.username:
        return False
    segments = parsed.path.split("/")
    if "%" in parsed.path or "\\" in parsed.path or {".", ".."} & set(segments):
        return False
    normal = f"{parsed.scheme}://{parsed.hostname}:{port}{parsed.path or '/'}"
    for prefix in allowed:
        p = urlparse(prefix)
        p_port = p.port or {"http": 80, "https": 443}.get(p.scheme)
        if normal.startswith(f"{p.scheme}://{p.hostname}:{p_port}{p.path or '/'}"):
            return True
    return False


def callback_allow_list(gateway_url: str, env=os.environ) -> list[str]:
    """FAASCI_CALLBACK_ALLOW: space-separated URL prefixes X-Callback-Url may name; by
    default only this gateway's own functions (`<gateway>/function/`)."""
    configured = env.get("FAASCI_CALLBACK_ALLOW")
    if configured is None:
        return [f"{gateway_url.rstrip('/')}/function/"]
    return configured.split()


def create_app(provider: Provider, bus: Bus, callback_allow: list[str] | None = None) -> Flask:
    """`callback_allow`: the X-Callback-Url prefixes accepted (see callback_allow_list)."""
    allow = callback_allow or []
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = SYNC_MAX_BYTES

    app.register_blueprint(openfaas_api.blueprint(provider))

    @app.errorhandler(UserError)
    def user_error(e: UserError):
        return error(e.status, e.message, e.field)

    def deployed(name: str) -> str:
        """The function of `<name>` or `<name>.<namespace>` (faas-cli's form); 404 unless
        it is deployed."""
        name, _, namespace = name.partition(".")
        if namespace not in ("", openfaas_api.NAMESPACE):
            raise NotFound(f"namespace {namespace!r} not found", "namespace")
        provider.get(name)
        return name

    def incoming_headers() -> dict:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}

    @app.route("/function/<name>/", defaults={"path": ""}, methods=METHODS, strict_slashes=False)
    @app.route("/function/<name>/<path:path>", methods=METHODS)
    def invoke_sync(name: str, path: str):
        name = deployed(name)
        started = time.monotonic()
        headers = incoming_headers()
        headers.setdefault("X-Call-Id", str(uuid.uuid4()))
        headers["X-Start-Time"] = str(time.time_ns())
        try:
            status, out_headers, body = provider.invoke(
                name,
                path,
                request.method,
                request.query_string.decode(),
                headers,
                request.get_data(),
                stream=True,  # passed on as it comes: a 300 MB log never whole in memory
            )
        except ConnectionError as e:
            return error(502, str(e), "function")
        resp = Response(body, status=status, direct_passthrough=True)
        for k, v in out_headers.items():
            resp.headers[k] = v
        resp.headers["X-Call-Id"] = headers["X-Call-Id"]
        resp.headers["X-Duration-Seconds"] = f"{time.monotonic() - started:.6f}"
        return resp

    @app.route(
        "/async-function/<name>/", defaults={"path": ""}, methods=METHODS, strict_slashes=False
    )
    @app.route("/async-function/<name>/<path:path>", methods=METHODS)
    def invoke_async(name: str, path: str):
        name = deployed(name)
        body = request.get_data()
        if len(body) > ASYNC_MAX_BYTES:
            return error(413, f"async request body is over {ASYNC_MAX_BYTES} bytes", "body")
        callback = request.headers.get("X-Callback-Url")
        if callback is not None:
            parsed = urlparse(callback)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                return error(
                    400, f"X-Callback-Url {callback!r} is not an http(s) URL", "X-Callback-Url"
                )
            if not callback_allowed(callback, allow):
                return error(400, f"X-Callback-Url {callback!r} is not allowed (allowed: "
                             f"{' '.join(allow) or 'none'}; FAASCI_CALLBACK_ALLOW)",
                             "X-Callback-Url")  # fmt: skip
        call_id = request.headers.get("X-Call-Id") or str(uuid.uuid4())
        headers = {
            k: v
            for k, v in incoming_headers().items()
            if k.lower() not in ("x-callback-url", "x-call-id")
        }
        message = queue.request_message(
            name,
            path,
            request.method,
            request.query_string.decode(),
            headers,
            body,
            call_id,
            callback,
        )
        try:
            bus.call(queue.enqueue, bus, message, timeout=15)
        except Exception as e:
            log.error("queueing %s failed: %s", name, e)
            return error(503, "the queue (NATS) is not available; try again", "queue")
        resp = Response(status=202)
        resp.headers["X-Call-Id"] = call_id
        return resp

    @app.get("/healthz")
    def healthz():
        return Response("OK")

    @app.get("/metrics")
    def prometheus_metrics():
        """The gateway's metrics (its queue's backlog), as OpenFaaS's gateway serves its own."""
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.errorhandler(413)
    def too_large(e):
        return error(413, f"request body is over {SYNC_MAX_BYTES} bytes", "body")

    @app.errorhandler(404)
    def not_found(e):
        return error(404, f"no route {request.path}", "path")

    @app.errorhandler(405)
    def bad_method(e):
        return error(405, f"method {request.method} not allowed on {request.path}", "method")

    return app


def run_schedules(provider: Provider, gateway_url: str, stop: threading.Event) -> None:
    """cron-connector's part: fire the deployed functions' schedules, following deploys
    that change them."""
    invoke = functools.partial(invoke_through_gateway, gateway_url)
    scheduler = Scheduler({}, invoke)
    while not stop.wait(1):
        scheduler = follow_schedules(scheduler, provider.schedules())
        for name in scheduler.due():
            log.info("cron: invoking %s", name)
            threading.Thread(target=invoke, args=(name,), daemon=True).start()


def follow_schedules(scheduler: Scheduler, schedules: dict[str, str]) -> Scheduler:
    """A scheduler for `schedules`; a schedule that did not change keeps its next time."""
    if schedules == scheduler.schedules:
        return scheduler
    fresh = Scheduler(schedules, scheduler.invoke, scheduler.now)
    kept = {n: at for n, at in scheduler.next.items() if schedules.get(n) == scheduler.schedules[n]}
    fresh.next.update(kept)
    return fresh


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message).2000s"
    )
    cfg = LocalConfig.from_env()
    stack = stack_file.load(cfg.stack_file)
    provider = Provider(cfg, stack)
    bus = Bus(cfg.nats_url, name="faasci-gateway", **client_settings(cfg).nats_credentials())
    app = create_app(provider, bus, callback_allow_list(cfg.gateway_url))
    bus.call(queue.ensure_queue, bus, patience=60)  # async requests can be taken from the start
    metrics.watch_queue(lambda: bus.call(queue.backlog, bus, timeout=3))
    provider.start()

    worker = queue.QueueWorker(
        bus, provider.invoke, int(os.environ.get("FAASCI_QUEUE_CONCURRENCY", "32"))
    )
    taking_work = asyncio.run_coroutine_threadsafe(worker.run(), bus.loop)

    stop = threading.Event()
    if os.environ.get("FAASCI_BUILTIN_CRON", "1") != "0":
        threading.Thread(
            target=run_schedules, args=(provider, cfg.gateway_url, stop), daemon=True
        ).start()

    def drain_then_exit() -> None:
        # As a node going down drains its pods: no new queued work is taken, the functions
        # finish what they hold (their hand-offs still reach this gateway and its queue),
        # then the gateway ends. A stage still running after its drain is recovered by its
        # lease once the stack is up again.
        log.info("stopping: draining the functions (up to %ds)", DRAIN_S)
        taking_work.cancel()
        stop.set()
        provider.stop()
        os._exit(0)

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=drain_then_exit).start())
    log.info("gateway on %s with %d functions", cfg.gateway_url, len(provider.functions))
    serve(
        app,
        host="127.0.0.1",
        port=cfg.gateway_port,
        threads=64,
        ident="faasci-gateway",
        channel_timeout=6 * 3600,
        channel_request_lookahead=1,  # so a followed log notices its client leaving
        # A streamed answer (a log) waits for its reader past 1 MiB instead of piling up
        # waitress's default 16 MiB, whose buffers left the heap fragmented: resident memory
        # grew ~17 MiB with every 200 MB log served, and stays flat with this.
        outbuf_high_watermark=1 << 20,
    )


if __name__ == "__main__":
    main()
