"""Which scheduled round a cron-connector request may run.

cron-connector sends no credentials (only `X-Connector: cron-connector` and `X-Topic`), so
anyone can send its request. What it may start is bounded instead: only the round of the
function's current schedule slot, only within WINDOW after the slot's time, and only once
per slot (a NATS key-value create on `<function>.<slot>`, atomic across replicas). A
forged request can therefore at most start the round that is due anyway, a moment early.

The function's schedule is its environment's FAASCI_SCHEDULE: the same cron expression as
its `schedule` annotation (one YAML anchor in stack.yml). Times are UTC, as cron-connector
and the local stack's scheduler use. faasci.api.Router asks `due(name)` for a request
without credentials; a function's signature or an admin token runs the round at any time.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta

from croniter import croniter

from . import once
from .errors import UserError

log = logging.getLogger("faasci.schedule")

WINDOW = timedelta(minutes=10)  # a slot's round may start this long after its time
EARLY = timedelta(seconds=30)  # a connector whose clock runs a little ahead is still on time
BUCKET = "faasci-schedule"
TTL_S = 2 * 24 * 3600  # a claim outlives its slot's window by far


class NotDue(UserError):
    """A cron-connector request when no round of the function is due: 403."""

    status = 403


def slot(schedule: str, now: datetime) -> datetime | None:
    """The fire time `now` belongs to: the latest at or before `now` when `now` is within
    WINDOW after it, else the next one when it is at most EARLY ahead; else None."""
    now = now.astimezone(UTC)
    # croniter's get_prev is strictly before its start: start from the next whole minute,
    # so a request at the very second of the slot belongs to it.
    minute = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    latest = croniter(schedule, minute).get_prev(datetime)
    if now - latest <= WINDOW:
        return latest
    upcoming = croniter(schedule, now).get_next(datetime)
    return upcoming if upcoming - now <= EARLY else None


def due(function: str, schedule: str | None = None, now: datetime | None = None) -> bool:
    """May this cron-connector request run `function`'s scheduled round?

    True: a slot is due and this request has claimed it (run the round). False: the slot
    is due but its round was claimed already (answer 200, skipped). Raises NotDue (403)
    when no slot is due now, or the function has no schedule (FAASCI_SCHEDULE)."""
    schedule = schedule if schedule is not None else os.environ.get("FAASCI_SCHEDULE", "")
    if not schedule.strip():
        raise NotDue(f"no scheduled round is due: {function} has no schedule (FAASCI_SCHEDULE)",
                     field="X-Connector")  # fmt: skip
    if not croniter.is_valid(schedule):
        raise NotDue(f"no scheduled round is due: FAASCI_SCHEDULE {schedule!r} of {function} "
                     "is not a cron expression", field="X-Connector")  # fmt: skip
    now = now or datetime.now(UTC)
    at = slot(schedule, now)
    if at is None:
        raise NotDue(f"no scheduled round is due for {function} at {_iso(now)} (schedule "
                     f"{schedule!r}; a round runs within {WINDOW.seconds // 60} minutes of "
                     "its time)", field="X-Connector")  # fmt: skip
    claimed = once.claim(BUCKET, f"{function}.{at:%Y%m%dT%H%M}Z", TTL_S)
    log.info("%s: the round of %s %s", function, _iso(at), "is ours" if claimed else "ran already")
    return claimed


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
