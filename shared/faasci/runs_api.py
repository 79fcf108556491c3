"""The `runs` function's resource: GET / (history), GET /<id> (one run), POST / (start one),
POST /<id>/cancel (stop one), POST /<id>/approve (an admin lets a promotion go on),
GET /audit (the audit trail), GET /graph (the services' dependency graph), GET /costs (what
runs cost: faasci.costs), GET and PUT /limits/<service> (faasci.limits)."""

from __future__ import annotations

import re

from . import audit, costs, downstream, gitops, limits, runs
from .api import Route, json_body, run_id_field, string_field
from .errors import UserError
from .services import run_store
from .trigger import start_run


def history(event, principal) -> dict:
    """GET /: the newest runs first; ?limit= (1-500, default 50), ?before=<run id> (the page
    after the one ending at that run: answered as `next`), ?service= (that service's only).
    A listing the store cannot give whole is a 503, never an empty list."""
    query = event.query
    before = query.get("before") or ""
    if before:
        run_id_field(before)
    service = query.get("service") or None
    if service is not None and not SERVICE_RE.match(service):
        raise UserError(f"service {service!r} is not a service name", field="service")
    found, after = run_store().page(_limit(query), before=before, service=service)
    return {"runs": [_summary(r) for r in found], "next": after}


def show(event, principal, run_id: str) -> dict:
    return run_store().get(run_id_field(run_id)).model_dump(mode="json")


def start(event, principal) -> dict:
    body = json_body(event)
    run = start_run(
        string_field(body, "repo"),
        string_field(body, "ref", required=False),
        trigger=body.get("trigger") if body.get("trigger") == "cli" else "http",
    )
    return {"statusCode": 201, "body": run.model_dump(mode="json")}


def cancel(event, principal, run_id: str) -> dict:
    run = run_store().get(run_id_field(run_id))  # 404 before anything is recorded
    audit.record("run.cancel", repo=run.repo, ref=run.ref, commit=run.commit, run=run.id)
    run, _ = run_store().update(run.id, runs.cancel, "run.cancelled")
    return run.model_dump(mode="json")


def approve(event, principal, run_id: str) -> dict:
    """POST /<id>/approve (role admin): approve the promotion the run's promote stage waits
    for (faasci.gitops); 409 when it waits for none. In the audit trail as run.approve."""
    run = run_store().get(run_id_field(run_id))  # 404 before anything is recorded
    gitops.approve(run, principal.actor)  # on a copy: a 409 records nothing
    audit.record("run.approve", repo=run.repo, ref=run.ref, commit=run.commit, run=run.id,
                 detail={"environment": run.approval.environment})  # fmt: skip
    run, _ = run_store().update(run.id, lambda r: gitops.approve(r, principal.actor),
                                "run.approved")  # fmt: skip
    return run.model_dump(mode="json")


def audit_entries(query) -> dict:
    """GET /audit (role admin: who did what is for administrators): the audit trail, oldest first;
    ?since= (ISO 8601 or 30m/1h/2d/1w), ?run=<id>, ?limit= (the newest that many, <= 10000)."""
    run = query.get("run") or None
    if run is not None:
        run_id_field(run)
    raw = query.get("limit", "1000")
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise UserError("limit must be a whole number from 1 to 10000", field="limit")
    try:
        found = audit.entries(since=query.get("since") or None, run=run, limit=int(raw))
    except ValueError as e:
        raise UserError(str(e), field="since") from None
    return {"entries": found}


def dependency_graph() -> dict:
    """GET /graph: the service catalog as a dependency graph (faasci.downstream.graph)."""
    return downstream.graph(downstream.catalog())


SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # as pipeline.Pipeline.service

ROUTES = [
    Route("GET", "/", "viewer", history),
    Route("GET", "/audit", "admin", lambda event, principal: audit_entries(event.query)),
    Route("GET", "/graph", "viewer", lambda event, principal: dependency_graph()),
    # ?by=service|stage|environment (default service), ?since=YYYY-MM-DD (default: this month)
    Route(
        "GET",
        "/costs",
        "viewer",
        lambda event, principal: costs.costs(
            event.query.get("by") or "service", event.query.get("since") or None
        ),
    ),
    # A service's limits (faasci.limits: concurrency cap, burst, budget) and its cap's use now.
    Route(
        "GET", "/limits/<service>", "viewer", lambda event, principal, service: limits.show(service)
    ),
    Route(
        "PUT",
        "/limits/<service>",
        "admin",
        lambda event, principal, service: limits.update(service, json_body(event)),
    ),
    Route("GET", "/<run_id>", "viewer", show),
    Route("POST", "/", "runner", start),
    Route("POST", "/<run_id>/cancel", "runner", cancel),
    Route("POST", "/<run_id>/approve", "admin", approve),
]


def _summary(run) -> dict:
    return run.model_dump(mode="json", exclude={"pipeline"})


def _limit(query) -> int:
    raw = query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise UserError("limit must be a whole number from 1 to 500", field="limit")
    return int(raw)
