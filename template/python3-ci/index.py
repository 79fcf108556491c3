"""The function server every faas-ci function runs: Flask served by waitress on port 8080.

As in OpenFaaS's python3-http template, the handler is `function/handler.py`'s
`handle(event, context)`; a dict it returns with `statusCode`, `body` and `headers`
becomes the response, a dict or list body as JSON. Errors are JSON bodies too.
"""

import json
import logging
import os
import socket
import sys

from flask import Flask, Response, request
from waitress import serve
from werkzeug.exceptions import HTTPException

from function import handler

MAX_BODY_BYTES = 256_000  # the OpenFaaS queue-worker's cap, enforced for every invocation

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
log = logging.getLogger("function")


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
@app.route("/_/ready")
def health():
    return json_response(200, {"status": "ok"})


@app.route("/", defaults={"path": ""}, methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
@app.route("/<path:path>", methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
def call_handler(path):
    return format_response(handler.handle(Event(), Context()))


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
    logging.basicConfig(
        stream=sys.stderr,
        level=os.getenv("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message).2000s",
    )
    serve(
        app,
        host=os.getenv("BIND_ADDRESS", "0.0.0.0"),
        port=int(os.getenv("PORT", "8080")),
        threads=int(os.getenv("THREADS", "8")),
        ident="faasci",
    )
