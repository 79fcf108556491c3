"""The `runs` function's resource: GET / (history), GET /<id> (one run), POST / (start one),
POST /<id>/cancel (stop one)."""

from __future__ import annotations

from . import runs
from .api import json_body, run_id_field, string_field
from .errors import NotFound, UserError
from .services import run_store
from .trigger import start_run


def route(event) -> dict:
    parts = [p for p in event.path.split("/") if p]
    if event.method == "GET" and not parts:
        return {"runs": [_summary(r) for r in run_store().list(_limit(event.query))]}
    if event.method == "GET" and len(parts) == 1:
        return run_store().get(run_id_field(parts[0])).model_dump(mode="json")
    if event.method == "POST" and not parts:
        body = json_body(event)
        run = start_run(
            string_field(body, "repo"),
            string_field(body, "ref", required=False),
            trigger=body.get("trigger") if body.get("trigger") == "cli" else "http",
        )
        return {"statusCode": 201, "body": run.model_dump(mode="json")}
    if event.method == "POST" and len(parts) == 2 and parts[1] == "cancel":
        run, _ = run_store().update(run_id_field(parts[0]), runs.cancel, "run.cancelled")
        return run.model_dump(mode="json")
    raise NotFound(f"no route {event.method} {event.path}", field="path")


def _summary(run) -> dict:
    return run.model_dump(mode="json", exclude={"pipeline"})


def _limit(query) -> int:
    raw = query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise UserError("limit must be a whole number from 1 to 500", field="limit")
    return int(raw)
