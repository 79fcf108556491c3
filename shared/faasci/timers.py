"""Work that must happen later, kept in JetStream so it survives any process: a retry
after its back-off, a check that a running attempt's worker is still alive, another try
at delivering an alert.

A timer is a message on `faasci.timers.<kind>`. The `timers` function's worker holds a
durable consumer: a message not yet due is handed back with a delay (`nak(delay)`), a due
one runs its handler, which may ask to be checked again later. Waiting therefore holds no
function worker and no thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from .bus import Bus

log = logging.getLogger("faasci.timers")

STREAM = "FAASCI_TIMERS"
SUBJECT = "faasci.timers"
DURABLE = "faasci-timers"

# A handler gets the timer's payload and returns None when done, or seconds until it wants
# to look again.
Handler = Callable[[dict], float | None]


STREAM_CONFIG = {"duplicate_window": 600}  # a timer id repeated within 10 minutes is dropped


async def ensure_stream(bus: Bus) -> None:
    await bus.ensure_stream(STREAM, [f"{SUBJECT}.>"], **STREAM_CONFIG)


def schedule(bus: Bus, kind: str, payload: dict, delay_s: float, timer_id: str) -> None:
    """Arm a timer `delay_s` from now; the same `timer_id` within ten minutes is stored once."""

    async def _schedule():
        await ensure_stream(bus)
        message = {"kind": kind, "due": time.time() + delay_s, **payload}
        await bus.publish_json(f"{SUBJECT}.{kind}", message, msg_id=timer_id)

    bus.call(_schedule, patience=120)  # repeating is safe: the timer id de-duplicates


class TimerWorker:
    def __init__(self, bus: Bus, handlers: dict[str, Handler], concurrency: int = 16):
        self.bus, self.handlers, self.concurrency = bus, handlers, concurrency
        self.fired = 0

    async def run(self) -> None:
        await self.bus.consume(STREAM, [f"{SUBJECT}.>"], DURABLE, self._handle, ack_wait=60,
                               max_deliver=-1, concurrency=self.concurrency,
                               **STREAM_CONFIG)  # fmt: skip

    async def _handle(self, msg) -> None:
        timer = json.loads(msg.data)
        wait = timer["due"] - time.time()
        if wait > 0:
            await msg.nak(delay=wait)
            return
        handler = self.handlers.get(timer["kind"])
        if handler is None:
            log.error("timer of unknown kind %r dropped", timer["kind"])
            await msg.term()
            return
        try:
            again = await asyncio.to_thread(handler, timer)
        except Exception:
            log.exception("%s timer failed; trying again in 5s", timer["kind"])
            again = 5
        self.fired += 1
        if again is None:
            await msg.ack()
        else:  # keep the timer, look again later
            await msg.nak(delay=again)
