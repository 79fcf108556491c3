"""The timers function's background worker: which handler each kind of timer runs."""

from __future__ import annotations

import asyncio

from . import alerts, services, stage
from .timers import TimerWorker

HANDLERS = {
    "dispatch": stage.on_dispatch_timer,
    "handoff": stage.on_handoff_timer,
    "lease": stage.on_lease_timer,
    "notify": alerts.on_notify_timer,
}


def start() -> TimerWorker:
    bus = services.bus()
    worker = TimerWorker(bus, HANDLERS)
    asyncio.run_coroutine_threadsafe(worker.run(), bus.loop)
    return worker
