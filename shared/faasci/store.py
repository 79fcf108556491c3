"""Run records in a NATS JetStream key-value bucket, and an event on NATS for every change.

Updates are compare-and-set on the entry's revision, so two functions changing one run
at once never overwrite each other: the loser re-reads and applies its change again.
Every call rides out a NATS restart (PATIENCE_S); the transitions in faasci.runs may be
applied twice without effect, which makes repeating a write of unknown outcome safe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from nats.js.errors import (
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from .bus import Bus
from .errors import NotFound, UserError
from .runs import Run

T = TypeVar("T")
PATIENCE_S = 120
KNOWN_RUNS = 256
log = logging.getLogger("faasci.store")

BUCKET = "faasci-runs"
# The index by service: an empty entry "<service, '.' as '='>.<run id>" per run, so a
# service's runs are listed from the stream's subjects without reading every run.
INDEX_BUCKET = "faasci-runs-by-service"
EVENTS_STREAM = "FAASCI_EVENTS"
EVENTS_SUBJECT = "faasci.events"  # faasci.events.<run id>


class ListingFailed(UserError):
    """The run store answered a listing it could not vouch for: an error, never an empty or
    partial list passed off as the history."""

    status = 503


def _service_token(service: str) -> str:
    return service.replace(".", "=")  # "=" is in no service name; "." splits NATS tokens


class RunStore:
    def __init__(self, bus: Bus):
        self.bus = bus
        self._announcing: set[asyncio.Task] = set()  # events on their way (kept referenced)
        # run id -> (record, revision) as this process last read or wrote it, the newest
        # KNOWN_RUNS: a stage hands its run's on to the next one (faasci.stage.handoff_body).
        self._known: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._known_lock = threading.Lock()

    def known(self, run_id: str) -> tuple[bytes, int] | None:
        """The record of `run_id` as this process last read or wrote it, and its revision
        (the two always belong together), or None."""
        with self._known_lock:
            return self._known.get(run_id)

    def _remember(self, run_id: str, record: bytes, revision: int) -> None:
        with self._known_lock:
            if revision >= self._known.get(run_id, (b"", 0))[1]:  # a slower read of an older one
                self._known[run_id] = (record, revision)
                self._known.move_to_end(run_id)
            while len(self._known) > KNOWN_RUNS:
                self._known.popitem(last=False)

    async def _kv(self):
        await self.bus.ensure_stream(EVENTS_STREAM, [f"{EVENTS_SUBJECT}.>"], max_age=7 * 24 * 3600)
        return await self.bus.bucket(BUCKET)

    def create(self, run: Run) -> Run:
        async def _create():
            kv = await self._kv()
            record = run.model_dump_json().encode()
            try:
                self._remember(run.id, record, await kv.create(run.id, record))
            except KeyWrongLastSequenceError:  # a repeat of a create that went through
                if (await self._get(run.id))[0] != run:
                    raise
            await self._index(run)
            self._announce(run, "run.created")

        self.bus.call(_create, patience=PATIENCE_S)
        return run

    def get(self, run_id: str) -> Run:
        return self.read(run_id)[0]

    def read(self, run_id: str) -> tuple[Run, int]:
        """The record and its revision: an `update` may start from them (`seen`)."""
        return self.bus.call(self._get, run_id, patience=PATIENCE_S)

    async def _get(self, run_id: str) -> tuple[Run, int]:
        kv = await self._kv()
        try:
            entry = await kv.get(run_id)
        except (KeyNotFoundError, InvalidKeyError):
            raise NotFound(f"no run {run_id!r}", field="run_id") from None
        self._remember(run_id, entry.value, entry.revision)
        return Run.model_validate_json(entry.value), entry.revision

    def update(self, run_id: str, change: Callable[[Run], T], event: str | None,
               seen: tuple[Run, int] | None = None) -> tuple[Run, T]:  # fmt: skip
        """Apply `change` to the run atomically; retried on a concurrent write. An exception
        from `change` leaves the record untouched. `event` names the change on NATS (None:
        not worth an event, such as a heartbeat). `seen`: the record as just `read` (its
        own, not to be used again), changed without reading it again (one round trip less);
        without it, the record as this process last read or wrote it (`known`). When that
        is no longer the newest, the write is refused and the change is applied to the
        newest; an exception `change` raises on it is raised only from the newest."""
        if seen is None and (known := self.known(run_id)):
            seen = Run.model_validate_json(known[0]), known[1]
        unread = [seen] if seen else []  # used once: not again by a retry of the call

        async def _update():
            kv = await self._kv()
            while True:
                fresh = not unread
                run, revision = unread.pop() if unread else await self._get(run_id)
                try:
                    result = change(run)
                except Exception:
                    if fresh:
                        raise
                    continue  # decided on a record that may be old: decide on the newest
                record = run.model_dump_json().encode()
                try:
                    self._remember(run_id, record, await kv.update(run_id, record, last=revision))
                except KeyWrongLastSequenceError:
                    continue
                if event:
                    self._announce(run, event)
                return run, result

        return self.bus.call(_update, patience=PATIENCE_S)

    def list(self, limit: int = 50, since: str = "", before: str = "",
             service: str | None = None) -> list[Run]:  # fmt: skip
        """The newest runs first, at most `limit`, none older than the run id `since` (run
        ids sort by creation time: "20261127-" is the 27th of November 2026 on)."""
        return self.page(limit, since=since, before=before, service=service)[0]

    def page(self, limit: int = 50, *, since: str = "", before: str = "",
             service: str | None = None) -> tuple[list[Run], str | None]:  # fmt: skip
        """One page of the history, newest first: at most `limit` runs with ids from `since`
        and below `before` (a cursor: the last id of the page before), of one `service`
        when given; and the cursor of the next page (None: no more). A listing the store
        cannot give whole raises ListingFailed (a 503), never answers fewer runs."""

        async def _page():
            await self._kv()
            ids = await self._ids(service)
            wanted = sorted((k for k in ids if k >= since and (not before or k < before)),
                            reverse=True)  # fmt: skip
            runs: list[Run] = []
            at = 0
            while len(runs) < limit and at < len(wanted):
                batch = wanted[at : at + limit - len(runs)]
                at += len(batch)
                found = await asyncio.gather(*(self._maybe(k) for k in batch))
                runs += [run for run in found if run is not None]
            return runs, (runs[-1].id if runs and at < len(wanted) else None)

        return self.bus.call(_page, patience=PATIENCE_S)

    async def _maybe(self, run_id: str) -> Run | None:
        try:
            return (await self._get(run_id))[0]
        except (NotFound, ValueError):  # deleted meanwhile; not a run
            return None

    async def _index(self, run: Run) -> None:
        index = await self.bus.bucket(INDEX_BUCKET)
        await index.put(f"{_service_token(run.service)}.{run.id}", b"")

    async def _ids(self, service: str | None) -> list[str]:
        """The run ids stored (of one service), read from the key-value streams' subjects:
        not kv.keys(), whose watcher can end before its first entry arrives when the
        client is busy, and then lists nothing."""
        prefix = f"$KV.{BUCKET}."
        every = [s.removeprefix(prefix) for s in await self._subjects(BUCKET, f"{prefix}>")]
        if service is None:
            return every
        await self.bus.bucket(INDEX_BUCKET)
        prefix = f"$KV.{INDEX_BUCKET}.{_service_token(service)}."
        indexed = {s.removeprefix(prefix) for s in await self._subjects(INDEX_BUCKET, f"{prefix}*")}
        # Runs stored before the index was, or whose index entry a crash lost: read once,
        # indexed, so the index is whole from then on.
        entries = await self._subjects(INDEX_BUCKET, f"$KV.{INDEX_BUCKET}.*.*", count=False)
        seen = {subject.rpartition(".")[2] for subject in entries}
        for run_id in every:
            if run_id in seen:
                continue
            run = await self._maybe(run_id)
            if run is not None:
                await self._index(run)
                if run.service == service:
                    indexed.add(run_id)
        return sorted(indexed)

    async def _subjects(self, bucket: str, subjects_filter: str, count: bool = True) -> list[str]:
        """Every subject of the bucket's stream matching the filter, page after page. An
        error, or an answer that does not add up, raises ListingFailed."""
        nc = await self.bus.nc()
        found: dict[str, int] = {}
        while True:
            request = {"subjects_filter": subjects_filter, "offset": len(found)}
            msg = await nc.request(f"$JS.API.STREAM.INFO.KV_{bucket}",
                                   json.dumps(request).encode(), timeout=5)  # fmt: skip
            try:
                answer = json.loads(msg.data)
            except ValueError as e:
                raise ListingFailed("listing runs failed: NATS answered no JSON") from e
            if "error" in answer:
                error = answer["error"].get("description", answer["error"])
                raise ListingFailed(f"listing runs failed: NATS said {error}")
            state = answer.get("state") or {}
            page = state.get("subjects") or {}
            found.update(page)
            total = answer.get("total", len(found))
            if not page or len(found) >= total:
                break
        if len(found) < total or (
            count
            and subjects_filter.endswith(".>")
            and len(found) != state.get("num_subjects", len(found))
        ):
            raise ListingFailed(
                f"listing runs failed: NATS listed {len(found)} of "
                f"{state.get('num_subjects', total)} entries; try again"
            )
        return list(found)

    def _announce(self, run: Run, event: str) -> None:
        """Publish a change's event (on the bus's loop) without holding up the writer: the
        record is what counts, and the next stage's start waits for no follower's event.
        Events leave in the order of their writes; one that fails is logged."""
        payload = {"event": event, "run_id": run.id, "status": run.status,
                   "stages": {s.name: s.status for s in run.stages}}  # fmt: skip
        task = asyncio.ensure_future(self.bus.publish_json(f"{EVENTS_SUBJECT}.{run.id}", payload))
        self._announcing.add(task)
        task.add_done_callback(self._announced)

    def _announced(self, task: asyncio.Task) -> None:
        self._announcing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("publishing a run event failed: %s", task.exception())
