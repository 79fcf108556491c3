"""What handlers share: JSON bodies in, dicts out, and every error as a JSON 4xx/5xx body.

A handler is `handle(event, context)` as in OpenFaaS's python3-http template; wrapped in
`endpoint`, it may return a plain dict (200) or raise a faasci.errors.UserError; a NATS
that stays unreachable is a 503 naming NATS_URL. The wrapped handler carries
`faasci.health.ready`, which the template serves on /_/ready.
"""

from __future__ import annotations

import functools
import json
import logging
import re

from . import STAGES, health
from .bus import NatsUnreachable
from .errors import UserError

log = logging.getLogger("faasci.api")

RUN_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


def endpoint(handler):
    @functools.wraps(handler)
    def handle(event, context):
        try:
            result = handler(event, context)
        except UserError as e:
            return {"statusCode": e.status, "body": e.body()}
        except NatsUnreachable as e:  # not the caller's fault, nor a bug: try again later
            return {"statusCode": 503, "body": {"error": str(e), "setting": e.setting}}
        if isinstance(result, dict) and "statusCode" in result:
            return result
        return {"statusCode": 200, "body": result}

    handle.ready = health.ready  # the template's readiness hook
    return handle


def is_cron(event) -> bool:
    """The request cron-connector sends: empty body, X-Connector: cron-connector."""
    return event.headers.get("X-Connector") == "cron-connector"


def json_body(event) -> dict:
    raw = event.body or b""
    if not raw.strip():
        raise UserError("request body is empty; expected a JSON object", field="body")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"request body is not valid JSON: {e}", field="body") from None
    if not isinstance(body, dict):
        raise UserError("request body must be a JSON object", field="body")
    return body


def string_field(body: dict, name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise UserError(f"{name} must be a non-empty string", field=name)
    return value


def run_id_field(value) -> str:
    if not isinstance(value, str) or not RUN_ID_RE.match(value):
        raise UserError(f"run_id {value!r} is not a run id", field="run_id")
    return value


def stage_handler(stage: str):
    """The whole handler of a stage function: an async hand-off ({"run_id", "attempt"}), a
    direct HTTP invocation ({"repo", "ref"} or {"run_id"}), or a cron-connector request."""
    assert stage in STAGES
    from . import trigger
    from .stage import execute

    @endpoint
    def handle(event, context):
        if is_cron(event):
            return trigger.scheduled(only=stage)
        body = json_body(event)
        if "run_id" in body:
            attempt = body.get("attempt")
            if attempt is not None and (not isinstance(attempt, int) or attempt < 1):
                raise UserError("attempt must be a positive integer", field="attempt")
            return execute(run_id_field(body["run_id"]), stage, attempt)
        if "repo" not in body:
            raise UserError('body needs "repo" (with an optional "ref") or "run_id"', field="repo")
        run = trigger.start_run(
            string_field(body, "repo"),
            string_field(body, "ref", required=False),
            trigger="http",
            only=stage,
            dispatch_first=False,
        )
        return execute(run.id, stage)

    return handle
