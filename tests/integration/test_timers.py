"""Timers on a real NATS server: due work fires after its delay, survives the worker,
and can ask to be looked at again."""

import asyncio
import threading
import time

from faasci import timers


def start(bus, handlers):
    worker = timers.TimerWorker(bus, handlers)
    asyncio.run_coroutine_threadsafe(worker.run(), bus.loop)
    return worker


def test_a_timer_fires_after_its_delay_once(nats_bus):
    """A timer armed for 1.5 s fires once, not before; a repeat with its id is ignored."""
    fired, done = [], threading.Event()

    def handler(timer):
        fired.append((timer["run_id"], time.monotonic()))
        done.set()

    armed = time.monotonic()
    timers.schedule(nats_bus, "dispatch", {"run_id": "r1"}, 1.5, "r1.due")
    timers.schedule(nats_bus, "dispatch", {"run_id": "r1"}, 1.5, "r1.due")
    start(nats_bus, {"dispatch": handler})
    assert done.wait(10)
    time.sleep(1)
    assert len(fired) == 1
    assert fired[0][1] - armed >= 1.4


def test_a_handler_can_look_again_later(nats_bus):
    """A handler returning seconds is called again after them, until it returns None."""
    calls = []

    def handler(timer):
        calls.append(time.monotonic())
        return 0.5 if len(calls) < 3 else None

    timers.schedule(nats_bus, "lease", {"run_id": "r2"}, 0, "r2.lease")
    start(nats_bus, {"lease": handler})
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert len(calls) == 3
    assert calls[2] - calls[1] >= 0.45


def test_timers_outlive_the_worker_that_was_down(nats_bus):
    """A timer armed while no worker runs fires when one starts later."""
    timers.schedule(nats_bus, "notify", {"run_id": "r3"}, 0.2, "r3.notify.1")
    time.sleep(0.5)
    got = threading.Event()
    start(nats_bus, {"notify": lambda timer: got.set()})
    assert got.wait(10)
