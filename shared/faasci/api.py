"""What handlers share: a Router that authenticates every request before its route runs,
JSON bodies in, dicts out, and every error as a JSON 4xx/5xx body.

A function's `handle` is a Router: a table of Route(method, pattern, role, fn). The router
finds the caller first (faasci.auth: an OIDC bearer token, a function's signature, a signed
link), so a caller without valid credentials gets 401 whatever the path; then 404 for an
unknown route, 403 without the role, else fn(event, principal, **params) with
faasci.auth.current set. A fn may return a plain dict (200) or a {"statusCode", "body",
"headers"} dict, or raise a faasci.errors.UserError; a NATS that stays unreachable is a 503
naming NATS_URL. The router carries `faasci.health.ready`, which the template serves on
/_/ready.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import STAGES, auth, health, jsonlog
from .bus import NatsUnreachable
from .errors import NotFound, UserError

log = logging.getLogger("faasci.api")

RUN_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")


def _answer(call) -> dict:
    """call()'s result as the template's response dict, errors mapped to their status."""
    try:
        result = call()
    except UserError as e:
        headers = getattr(e, "headers", None)
        return {
            "statusCode": e.status,
            "body": e.body(),
            **({"headers": headers} if headers else {}),
        }
    except NatsUnreachable as e:  # not the caller's fault, nor a bug: try again later
        return {"statusCode": 503, "body": {"error": str(e), "setting": e.setting}}
    if isinstance(result, dict) and "statusCode" in result:
        return result
    return {"statusCode": 200, "body": result}


def endpoint(handler):
    """A handler(event, context) with the router's error mapping and no authentication: for
    the template's tests only; a function's handle is a Router."""

    @functools.wraps(handler)
    def handle(event, context):
        return _answer(lambda: handler(event, context))

    handle.ready = health.ready  # the template's readiness hook
    return handle


_SEGMENT = re.compile(r"<(?:(path):)?([a-z_]+)>")


@dataclass(frozen=True)
class Route:
    """`pattern`: "/", "/<run_id>", "/<run_id>/cancel", "/<path:rest>" (the rest, slashes and
    all). `role`: the least role a caller needs (auth.ROUTE_ROLES). `link`, on a viewer
    route: link(event, **params) says whether the request's ?sig= opens it without a token
    (a log link in a chat message)."""

    method: str
    pattern: str
    role: str
    fn: Callable
    link: Callable[..., bool] | None = None
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.role not in auth.ROUTE_ROLES:
            raise ValueError(f"route {self.method} {self.pattern}: role {self.role!r} is not "
                             f"one of {', '.join(auth.ROUTE_ROLES)}")  # fmt: skip
        if self.link and self.role != "viewer":
            raise ValueError("only a viewer route may be opened by a signed link")
        parts, at = [], 0
        for m in _SEGMENT.finditer(self.pattern):
            parts.append(re.escape(self.pattern[at : m.start()]))
            parts.append(f"(?P<{m[2]}>.+)" if m[1] else f"(?P<{m[2]}>[^/]+)")
            at = m.end()
        parts.append(re.escape(self.pattern[at:]))
        object.__setattr__(self, "method", self.method.upper())
        object.__setattr__(self, "regex", re.compile("".join(parts)))

    def match(self, method: str, path: str) -> dict | None:
        m = self.regex.fullmatch(path) if method.upper() == self.method else None
        return m.groupdict() if m else None


class Router:
    """A function's handle(event, context): routes tried in order, the first match wins.

    A cron-connector request (X-Connector: cron-connector, empty body) runs `on_schedule()`
    when faasci.schedule says this function's slot is due (cron-connector sends no
    credentials); with a function's signature or an admin token it runs at any time."""

    ready = staticmethod(health.ready)  # the template's readiness hook

    def __init__(self, name: str, routes: list[Route], on_schedule: Callable | None = None):
        self.name, self.routes, self.on_schedule = name, list(routes), on_schedule
        auth.set_identity(name)  # what this process's signed calls say they come from

    def __call__(self, event, context=None) -> dict:
        return _answer(lambda: self._dispatch(event))

    def _dispatch(self, event):
        path = "/" + event.path.strip("/")
        if self.on_schedule and is_cron(event) and not (event.body or b"").strip():
            return self._scheduled(event)
        route, params = next(((r, p) for r in self.routes
                              if (p := r.match(event.method, path)) is not None),
                             (None, None))  # fmt: skip
        if route is not None and route.role == "webhook":  # fn checks the git host's signature
            with auth.acting(None):
                return route.fn(event, None, **params)
        link = route and route.link and functools.partial(route.link, event, **params)
        principal = auth.authenticate(event, self.name, link=link)
        if route is None:
            raise NotFound(f"no route {event.method} {path}", field="path")
        opened_by_link = principal.kind == "link" and route.link is not None
        if not (opened_by_link or principal.allows(route.role)):
            raise auth.Forbidden(f"{principal.actor} may not {event.method} {path} of "
                                 f"{self.name}: it needs role {route.role}",
                                 route.role)  # fmt: skip
        with auth.acting(principal), jsonlog.bind(run_id=_run_of(event, params)):
            return route.fn(event, principal, **params)

    def _scheduled(self, event):
        from . import schedule

        credentials = event.headers.get("Authorization") or event.headers.get(auth.SIGNATURE_HEADER)
        if credentials:
            principal = auth.authenticate(event, self.name)
            if not principal.allows("admin"):
                raise auth.Forbidden(f"{principal.actor} may not run the schedule of "
                                     f"{self.name}: it needs role admin", "admin")  # fmt: skip
        elif schedule.due(self.name):
            principal = auth.Principal("cron-connector", "scheduler")
        else:
            log.info("%s: a cron request for a slot that ran already; nothing run", self.name)
            ran = f"this slot's scheduled round of {self.name} ran already"
            return {"trigger": "cron", "skipped": ran}
        with auth.acting(principal):
            return self.on_schedule()


def _run_of(event, params: dict) -> str | None:
    """The run a request is about, for its log lines (faasci.jsonlog): the route's
    <run_id>, else the JSON body's "run_id" (a hand-off, a notification); None unless it
    has a run id's form. A body that does not parse is the route's to refuse."""
    found = params.get("run_id")
    if found is None and (event.body or b"").lstrip()[:1] == b"{":
        with contextlib.suppress(ValueError, RecursionError):
            body = json.loads(event.body)
            found = body.get("run_id") if isinstance(body, dict) else None
    return found if isinstance(found, str) and RUN_ID_RE.match(found) else None


def is_cron(event) -> bool:
    """The request cron-connector sends: empty body, X-Connector: cron-connector."""
    return event.headers.get("X-Connector") == "cron-connector"


MAX_JSON_DEPTH = 64  # arrays and objects inside one another; no request needs more
MAX_JSON_BYTES = 256_000  # the template's (and the queue-worker's) cap on any body
# A JSON string (or the unterminated rest of one), its loop unrolled so that runs of plain
# characters match in one step: ten times faster on a hand-off's record than an alternation.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?')
NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes | str) -> int:
    """How deeply arrays and objects nest in a JSON text, without parsing it (so without
    recursion): brackets inside strings do not count. Linear, and fast on the largest body."""
    data = raw.encode() if isinstance(raw, str) else raw
    brackets = JSON_STRING.sub(b"", data).translate(None, NOT_BRACKETS)
    if not brackets:
        return 0
    return max(itertools.accumulate(1 if c in b"[{" else -1 for c in brackets))


def json_body(event) -> dict:
    raw = event.body or b""
    if not raw.strip():
        raise UserError("request body is empty; expected a JSON object", field="body")
    if len(raw) > MAX_JSON_BYTES:
        raise UserError(f"request body is over {MAX_JSON_BYTES} bytes", field="body")
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise UserError(f"request body nests arrays/objects deeper than {MAX_JSON_DEPTH}",
                        field="body")  # fmt: skip
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"request body is not valid JSON: {e}", field="body") from None
    except RecursionError:  # cannot happen below MAX_JSON_DEPTH; never a 500 if it does
        raise UserError(f"request body nests deeper than {MAX_JSON_DEPTH}", field="body") from None
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


def _handed_record(body: dict, run_id: str, principal) -> tuple | None:
    """The run record a hand-off carries ({"seen": {"revision", "record"}}: faasci.stage.
    dispatch), as RunStore.update's `seen`. Only from a function, whose signature covers
    the body: anyone else's record is not read, and its claim reads the store."""
    seen = body.get("seen")
    if principal is None or principal.kind != "function" or not isinstance(seen, dict):
        return None
    from .runs import Run

    try:
        run = Run.model_validate_json(seen["record"])
    except (KeyError, TypeError, ValueError):
        log.warning("run %s: the record handed on does not read; reading the store", run_id)
        return None
    revision = seen.get("revision")
    if run.id != run_id or not isinstance(revision, int):
        return None
    return run, revision


def stage_router(stage: str) -> Router:
    """The whole handle of a stage function: POST / with an async hand-off ({"run_id",
    "attempt"}, signed by the function before) or a direct invocation ({"repo", "ref"} or
    {"run_id"}) by a runner."""
    assert stage in STAGES
    from . import trigger
    from .stage import execute, recover_spooled, sweep_workdirs

    sweep_workdirs()  # what a process of this function left when it died
    recover_spooled()

    def invoke(event, principal):
        body = json_body(event)
        if "run_id" in body:
            attempt = body.get("attempt")
            if attempt is not None and (not isinstance(attempt, int) or attempt < 1):
                raise UserError("attempt must be a positive integer", field="attempt")
            if principal is not None and principal.kind == "user":  # a person, not a hand-off
                from . import audit

                audit.record("stage.continue", run=run_id_field(body["run_id"]),
                             detail={"stage": stage, "attempt": attempt})  # fmt: skip
            run_id = run_id_field(body["run_id"])
            return execute(run_id, stage, attempt, seen=_handed_record(body, run_id, principal))
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

    return Router(stage, [Route("POST", "/", "runner", invoke)])
