"""Run records in a NATS JetStream key-value bucket, and an event on NATS for every change.

Updates are compare-and-set on the entry's revision, so two functions changing one run
at once never overwrite each other: the loser re-reads and applies its change again.
Every call rides out a NATS restart (PATIENCE_S); the transitions in faasci.runs may be
applied twice without effect, which makes repeating a write of unknown outcome safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

from nats.js.errors import (
    InvalidKeyError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from .bus import Bus
from .errors import NotFound
from .runs import Run

T = TypeVar("T")
PATIENCE_S = 120

BUCKET = "faasci-runs"
EVENTS_STREAM = "FAASCI_EVENTS"
EVENTS_SUBJECT = "faasci.events"  # faasci.events.<run id>


class RunStore:
    def __init__(self, bus: Bus):
        self.bus = bus

    async def _kv(self):
        await self.bus.ensure_stream(EVENTS_STREAM, [f"{EVENTS_SUBJECT}.>"], max_age=7 * 24 * 3600)
        return await self.bus.bucket(BUCKET)

    def create(self, run: Run) -> Run:
        async def _create():
            kv = await self._kv()
            try:
                await kv.create(run.id, run.model_dump_json().encode())
            except KeyWrongLastSequenceError:  # a repeat of a create that went through
                if (await self._get(run.id))[0] != run:
                    raise
            await self._publish(run, "run.created")

        self.bus.call(_create, patience=PATIENCE_S)
        return run

    def get(self, run_id: str) -> Run:
        return self.bus.call(self._get, run_id, patience=PATIENCE_S)[0]

    async def _get(self, run_id: str) -> tuple[Run, int]:
        kv = await self._kv()
        try:
            entry = await kv.get(run_id)
        except (KeyNotFoundError, InvalidKeyError):
            raise NotFound(f"no run {run_id!r}", field="run_id") from None
        return Run.model_validate_json(entry.value), entry.revision

    def update(self, run_id: str, change: Callable[[Run], T], event: str | None) -> tuple[Run, T]:
        """Apply `change` to the run atomically; retried on a concurrent write. An exception
        from `change` leaves the record untouched. `event` names the change on NATS (None:
        not worth an event, such as a heartbeat)."""

        async def _update():
            kv = await self._kv()
            while True:
                run, revision = await self._get(run_id)
                result = change(run)
                try:
                    await kv.update(run_id, run.model_dump_json().encode(), last=revision)
                except KeyWrongLastSequenceError:
                    continue
                if event:
                    await self._publish(run, event)
                return run, result

        return self.bus.call(_update, patience=PATIENCE_S)

    def list(self, limit: int = 50, since: str = "") -> list[Run]:
        """The newest runs first, at most `limit`, none older than the run id `since` (run
        ids sort by creation time: "20261127-" is the 27th of November 2026 on)."""

        async def _list():
            await self._kv()
            # The stream's subjects, not kv.keys(): nats-py's keys() watcher can end before
            # its first entry arrives when the client is busy, and then lists nothing.
            prefix = f"$KV.{BUCKET}."
            js = await self.bus.js()
            info = await js.stream_info(f"KV_{BUCKET}", subjects_filter=f"{prefix}>")
            keys = [subject.removeprefix(prefix) for subject in info.state.subjects or {}]
            runs = []
            for key in sorted((k for k in keys if k >= since), reverse=True)[:limit]:
                with contextlib.suppress(NotFound, ValueError):  # deleted meanwhile; not a run
                    runs.append((await self._get(key))[0])
            return runs

        return self.bus.call(_list, patience=PATIENCE_S)

    async def _publish(self, run: Run, event: str) -> None:
        await self.bus.publish_json(
            f"{EVENTS_SUBJECT}.{run.id}",
            {
                "event": event,
                "run_id": run.id,
                "status": run.status,
                "stages": {s.name: s.status for s in run.stages},
            },
        )
