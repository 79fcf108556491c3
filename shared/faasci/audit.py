"""The audit trail: who started, cancelled, retried, purged or rotated what, and when.

Every entry is one message of the JetStream stream `faasci-audit`, created with
`deny_delete` and `deny_purge`: JetStream itself refuses to delete a message or purge the
stream, whoever asks, and this module offers no way to change or remove an entry. On the
local stack NATS also denies every client the stream's delete, purge, message-delete and
update requests (faasci.local.services), so not even the platform's own credentials can
drop it.

Retention: everything is kept (no max age, count or size). An entry is a few hundred
bytes, so even 10,000 triggers a day is about a gigabyte a year; an operator who must cap it
archives the stream (`nats stream backup`) and adds a limit deliberately, outside faasci.

Subjects are `faasci.audit.<run id>` (or `faasci.audit._` for an action on no run), so
the entries of one run are read without scanning the rest.

Entries (JSON): time (UTC ISO 8601), actor ("user:alice", "function:unit", "github:octocat",
"scheduler:cron-connector", "system"), action (run.start, run.cancel, stage.retry,
cache.purge, secrets.rotate, secrets.write, run.approve, ...), repo, ref, commit, run, detail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = logging.getLogger("faasci.audit")

STREAM = "faasci-audit"
SUBJECT = "faasci.audit"  # faasci.audit.<run id> or faasci.audit._
NO_RUN = "_"
PATIENCE_S = 120
_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _stream_config() -> dict[str, Any]:
    return {"deny_delete": True, "deny_purge": True, "allow_rollup_hdrs": False}


async def _ensure(bus) -> None:
    await bus.ensure_stream(STREAM, [f"{SUBJECT}.>"], **_stream_config())


def _actor() -> str:
    try:
        from . import auth  # helper A's module; absent in an older tree
    except ImportError:
        return "system"
    try:
        return auth.actor()
    except Exception:  # no request context or an incomplete auth module: not our concern
        return "system"


def _subject(run: str | None) -> str:
    token = run if run and _SAFE_TOKEN.match(run) else NO_RUN
    return f"{SUBJECT}.{token}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(action: str, *, actor: str | None = None, repo: str | None = None,
           ref: str | None = None, commit: str | None = None, run: str | None = None,
           detail: dict | None = None, bus=None) -> None:  # fmt: skip
    """Append one entry to the audit trail (waits out a NATS restart, like run records)."""
    entry = {
        "time": now_iso(),
        "actor": actor or _actor(),
        "action": action,
        "repo": repo,
        "ref": ref,
        "commit": commit,
        "run": run,
        "detail": detail or {},
    }
    if bus is None:
        from .services import bus as default_bus

        bus = default_bus()

    async def _publish():
        await _ensure(bus)
        js = await bus.js()
        await js.publish(_subject(run), json.dumps(entry, default=str).encode())

    bus.call(_publish, patience=PATIENCE_S)
    log.info("audit: %s by %s (run %s)", action, entry["actor"], run or "-")


def parse_since(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 time (UTC when it names no zone) or a duration back from now: 30m, 1h,
    2d, 1w. Raises ValueError naming the value otherwise."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    text = value.strip()
    match = re.fullmatch(r"(\d+)\s*([smhdw])", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
        return datetime.now(UTC) - timedelta(**{unit[match[2]]: int(match[1])})
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since {value!r} is neither an ISO 8601 time nor a duration like 1h or 2d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def entries(since: str | datetime | None = None, run: str | None = None,
            limit: int | None = None, bus=None) -> list[dict]:  # fmt: skip
    """The entries, oldest first: those at or after `since`, of run `run`; with `limit`,
    only the newest `limit` of them."""
    start = parse_since(since)
    if bus is None:
        from .services import bus as default_bus

        bus = default_bus()
    subject = _subject(run) if run else f"{SUBJECT}.>"
    if run and not _SAFE_TOKEN.match(run):
        return []

    async def _read():
        await _ensure(bus)
        js = await bus.js()
        policy = {"deliver_policy": DeliverPolicy.ALL}
        if start:
            policy = {"deliver_policy": DeliverPolicy.BY_START_TIME,
                      "opt_start_time": start.isoformat().replace("+00:00", "Z")}  # fmt: skip
        elif limit and not run:  # the newest `limit`: no need to read what comes before
            last = (await js.stream_info(STREAM)).state.last_seq
            policy = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
                      "opt_start_seq": max(1, last - limit + 1)}  # fmt: skip
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30,
                                mem_storage=True, **policy)  # fmt: skip
        sub = await js.pull_subscribe(subject, stream=STREAM, config=config)
        found: list[dict] = []
        try:
            while True:
                try:
                    msgs = await sub.fetch(256, timeout=1)
                except TimeoutError:
                    break
                for msg in msgs:
                    try:
                        found.append(json.loads(msg.data))
                    except ValueError:
                        log.warning("audit: entry %s is not JSON", msg.metadata.sequence.stream)
                    if limit:
                        del found[:-limit]
                if not msgs or msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):  # the consumer goes by itself anyway
                await sub.unsubscribe()
        return found

    return bus.call(_read, patience=PATIENCE_S)
