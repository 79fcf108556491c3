"""The local gateway: OpenFaaS's HTTP contract in front of the provider's processes.

  /function/<name>[/<path>]        synchronous invocation
  /async-function/<name>[/<path>]  202 Accepted; queued on JetStream (see queue.py)
  /system/functions                the deployed functions, in the gateway's JSON form
  /healthz

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

from .. import stack as stack_file
from ..bus import Bus
from . import queue
from .config import LocalConfig
from .cron import Scheduler, invoke_through_gateway
from .provider import HOP_HEADERS, Provider

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


def create_app(provider: Provider, bus: Bus) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = SYNC_MAX_BYTES

    def unknown(name: str) -> Response | None:
        if name not in provider.functions:
            return error(404, f"function {name!r} not found", "function")
        return None

    def incoming_headers() -> dict:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}

    @app.route("/function/<name>", defaults={"path": ""}, methods=METHODS)
    @app.route("/function/<name>/<path:path>", methods=METHODS)
    def invoke_sync(name: str, path: str):
        if (missing := unknown(name)) is not None:
            return missing
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
            )
        except ConnectionError as e:
            return error(502, str(e), "function")
        resp = Response(body, status=status)
        for k, v in out_headers.items():
            resp.headers[k] = v
        resp.headers["X-Call-Id"] = headers["X-Call-Id"]
        resp.headers["X-Duration-Seconds"] = f"{time.monotonic() - started:.6f}"
        return resp

    @app.route("/async-function/<name>", defaults={"path": ""}, methods=METHODS)
    @app.route("/async-function/<name>/<path:path>", methods=METHODS)
    def invoke_async(name: str, path: str):
        if (missing := unknown(name)) is not None:
            return missing
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

    @app.get("/system/functions")
    def list_functions():
        return jsonify([describe(fn) for fn in provider.functions.values()])

    @app.get("/system/function/<name>")
    def one_function(name: str):
        if (missing := unknown(name)) is not None:
            return missing
        return jsonify(describe(provider.functions[name]))

    @app.get("/healthz")
    def healthz():
        return Response("OK")

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


def describe(fn) -> dict:
    ready = fn.proc is not None and fn.proc.poll() is None and fn.ready()
    return {
        "name": fn.spec.name,
        "image": fn.spec.image,
        "namespace": "openfaas-fn",
        "envProcess": "python index.py",
        "labels": fn.spec.labels,
        "annotations": fn.spec.annotations,
        "invocationCount": fn.invocations,
        "replicas": 1,
        "availableReplicas": 1 if ready else 0,
        "restarts": fn.restarts,
        "pid": fn.proc.pid if fn.proc else None,
    }


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message).2000s"
    )
    cfg = LocalConfig.from_env()
    stack = stack_file.load(cfg.stack_file)
    provider = Provider(cfg, stack)
    bus = Bus(cfg.nats_url, name="faasci-gateway")
    app = create_app(provider, bus)
    bus.call(queue.ensure_queue, bus, patience=60)  # async requests can be taken from the start
    provider.start()

    worker = queue.QueueWorker(
        bus, provider.invoke, int(os.environ.get("FAASCI_QUEUE_CONCURRENCY", "32"))
    )
    asyncio.run_coroutine_threadsafe(worker.run(), bus.loop)

    stop = threading.Event()
    schedules = {n: s.schedule for n, s in stack.functions.items() if s.schedule}
    cron = Scheduler(schedules, functools.partial(invoke_through_gateway, cfg.gateway_url))
    threading.Thread(target=cron.run, args=(stop,), daemon=True).start()

    def shutdown(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, shutdown)
    try:
        log.info("gateway on %s with %d functions", cfg.gateway_url, len(provider.functions))
        serve(
            app,
            host="127.0.0.1",
            port=cfg.gateway_port,
            threads=64,
            ident="faasci-gateway",
            channel_timeout=6 * 3600,
        )
    finally:
        stop.set()
        provider.stop()


if __name__ == "__main__":
    main()
