"""Per-service limits: how many stage executions of a service run at once (`concurrency`,
with a `burst` allowed for `burst_window_s`: faasci.caps) and what it may spend in a month
(`monthly_budget`: faasci.costs).

The defaults come from the environment (FAASCI_CONCURRENCY, FAASCI_BURST,
FAASCI_BURST_WINDOW_S; FAASCI_MONTHLY_BUDGET, none by default). An admin overrides them per
service (`PUT /function/runs/limits/<service>`, `faasci limits SERVICE ...`): the fields it
sets are kept in the NATS KV bucket `faasci-limits` (key: the service), the rest follow the
defaults. A burst below the concurrency means no burst (the burst is never under the cap).

Every stage execution asks for its service's limits, so a process keeps what it read for
CACHE_S: a change reaches every function within that.
"""

from __future__ import annotations

import os
import re
import threading
import time

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from .errors import UserError

BUCKET = "faasci-limits"
PATIENCE_S = 30
CACHE_S = 5.0
SERVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # as pipeline.Pipeline.service
MAX_CONCURRENCY = 10_000
MAX_WINDOW_S = 7 * 24 * 3600


class Limits(BaseModel):
    """What one service may use: the effective values (its overrides over the defaults)."""

    concurrency: int = 10  # stage executions at once
    burst: int = 25  # at once while a burst lasts (demand over `concurrency`)
    burst_window_s: float = 60  # how long a burst lasts (then as long at the cap: faasci.caps)
    monthly_budget: float | None = None  # in the rate card's currency (faasci.costs)


class Overrides(BaseModel):
    """The fields an admin set for a service (the request body of PUT, and what is stored).
    null clears a field (back to the default)."""

    model_config = ConfigDict(extra="forbid")

    concurrency: StrictInt | None = Field(None, ge=1, le=MAX_CONCURRENCY)
    burst: StrictInt | None = Field(None, ge=1, le=MAX_CONCURRENCY)
    burst_window_s: StrictInt | StrictFloat | None = Field(None, ge=0, le=MAX_WINDOW_S)
    monthly_budget: StrictInt | StrictFloat | None = Field(None, gt=0, le=1e12)


def defaults(env: dict[str, str] | None = None) -> Limits:
    """The limits of a service nobody set any for, from the environment."""
    env = os.environ if env is None else env
    base = Limits()
    values = {
        "concurrency": _env_number(env, "FAASCI_CONCURRENCY", int, base.concurrency),
        "burst": _env_number(env, "FAASCI_BURST", int, base.burst),
        "burst_window_s": _env_number(env, "FAASCI_BURST_WINDOW_S", float, base.burst_window_s),
        "monthly_budget": _env_number(env, "FAASCI_MONTHLY_BUDGET", float, None),
    }
    return _effective(values)


def _env_number(env, name: str, kind, default):
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < (1 if kind is int else 0):
        raise ValueError(f"{name}={raw!r} is too small")
    return value


def _effective(values: dict) -> Limits:
    limits = Limits(**values)
    limits.burst = max(limits.burst, limits.concurrency)  # a burst never goes under the cap
    return limits


def merged(overrides: Overrides, base: Limits | None = None) -> Limits:
    """The overrides over the defaults (`base`)."""
    base = base or defaults()
    values = base.model_dump()
    values.update(overrides.model_dump(exclude_none=True))
    return _effective(values)


# The store, and a cache of it per process.

_cache: dict[str, tuple[float, Overrides]] = {}
_cache_lock = threading.Lock()


def for_service(service: str) -> Limits:
    """The effective limits of `service` (read at most every CACHE_S per process)."""
    return merged(overrides_of(service))


def overrides_of(service: str, fresh: bool = False) -> Overrides:
    """What an admin set for `service` (none: all defaults)."""
    now = time.monotonic()
    with _cache_lock:
        cached = _cache.get(service)
    if cached and not fresh and now - cached[0] < CACHE_S:
        return cached[1]
    found = _read(service)
    with _cache_lock:
        _cache[service] = (now, found)
    return found


def _read(service: str) -> Overrides:
    from nats.js.errors import KeyNotFoundError

    from . import services

    async def _get() -> Overrides:
        kv = await services.bus().bucket(BUCKET)
        try:
            entry = await kv.get(service)
        except KeyNotFoundError:
            return Overrides()
        return Overrides.model_validate_json(entry.value) if entry.value else Overrides()

    return services.bus().call(_get, patience=PATIENCE_S)


def set_overrides(service: str, body: dict) -> Overrides:
    """Apply a PUT body to the service's stored overrides (compare-and-set, so two admins
    at once both land): the fields it names are set, null ones cleared, the others kept.
    Bad input raises UserError naming the field; nothing is written then."""
    from . import services
    from .bus import compare_and_set

    change = parse_body(body)

    def apply(value: bytes | None) -> tuple[bytes, Overrides]:
        stored = Overrides.model_validate_json(value or b"{}")
        updated = stored.model_copy(update=change)
        check(updated)
        return updated.model_dump_json(exclude_none=True).encode(), updated

    async def _update() -> Overrides:
        return await compare_and_set(await services.bus().bucket(BUCKET), service, apply)

    updated = services.bus().call(_update, patience=PATIENCE_S)
    with _cache_lock:
        _cache[service] = (time.monotonic(), updated)
    return updated


def service_field(service: str) -> str:
    if not isinstance(service, str) or not SERVICE_RE.match(service):
        raise UserError(f"service {service!r} is not a service name", field="service")
    return service


def parse_body(body: dict) -> dict:
    """The fields a PUT body sets (a null clears one); UserError naming the first bad field."""
    if not body:
        raise UserError("the body names no limit: set concurrency, burst, burst_window_s or "
                        "monthly_budget", field="body")  # fmt: skip
    try:
        parsed = Overrides.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "body"
        if first["type"] == "extra_forbidden":
            message = (f"{name} is not a limit (concurrency, burst, burst_window_s, "
                       "monthly_budget)")  # fmt: skip
        else:
            message = f"{name}: {first['msg']} (got {first.get('input')!r})"
        raise UserError(message, field=name) from None
    return {name: getattr(parsed, name) for name in body}


def check(overrides: Overrides) -> None:
    """A service's overrides as a whole: a burst set below the concurrency set is a mistake."""
    burst, concurrency = overrides.burst, overrides.concurrency
    if burst is not None and concurrency is not None and burst < concurrency:
        raise UserError(f"burst {burst} is below concurrency {concurrency}: a burst "
                        "allows more at once, never fewer", field="burst")  # fmt: skip


def describe(service: str, overrides: Overrides) -> dict:
    """The API's answer: the effective limits, and which of them were set for the service."""
    return {
        "service": service,
        **merged(overrides).model_dump(),
        "overrides": overrides.model_dump(exclude_none=True),
    }


def show(service: str) -> dict:
    """GET /limits/<service>: its limits, and what its cap is doing now (faasci.caps.usage:
    running, waiting, the limit now, the last burst's window)."""
    from . import caps

    answer = describe(service, overrides_of(service_field(service), fresh=True))
    return {**answer, "usage": caps.usage(service)}


def update(service: str, body: dict) -> dict:
    """PUT /limits/<service> (admins): recorded in the audit trail as limits.set."""
    from . import audit

    service_field(service)
    change = parse_body(body)  # 400 before anything is recorded
    check(overrides_of(service, fresh=True).model_copy(update=change))
    audit.record("limits.set", detail={"service": service, **change})
    return describe(service, set_overrides(service, body))
