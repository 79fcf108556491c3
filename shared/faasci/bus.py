"""NATS and JetStream for synchronous code.

Function handlers run in waitress's worker threads, while nats-py is asyncio. One event
loop per process runs in a daemon thread and owns the connection; `Bus.call` runs a
coroutine there and waits for it. The connection reconnects forever, so a restarted NATS
server is a pause, not an error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue

T = TypeVar("T")
log = logging.getLogger("faasci.bus")


def transient(error: BaseException) -> bool:
    """May the same call succeed a little later? True for everything a restarting NATS
    server or a JetStream not yet ready raises (timeouts, EOFs, no responders, refused
    connections); false for JetStream's answers about the request itself."""
    if isinstance(error, APIError):
        return isinstance(error, ServiceUnavailableError)
    return isinstance(error, nats.errors.Error | OSError)  # TimeoutError is an OSError


class Bus:
    def __init__(self, url: str, name: str = "faasci"):
        self.url = url
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        self._nc: nats.NATS | None = None
        self._buckets: dict[str, KeyValue] = {}
        self._streams: set[str] = set()
        self._connect_lock = asyncio.Lock()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = 60,
             patience: float = 0) -> T:  # fmt: skip
        """Run `fn(*args)` on the bus's loop and wait for its result. With `patience`, a
        transient failure is tried again (fn must be safe to repeat) for that many seconds."""
        deadline = time.monotonic() + patience
        wait = 0.2
        while True:
            try:
                return asyncio.run_coroutine_threadsafe(fn(*args), self._loop).result(timeout)
            except Exception as e:
                if not transient(e) or time.monotonic() + wait > deadline:
                    raise
                log.warning("NATS: %s; trying again in %.1fs", type(e).__name__, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def nc(self) -> nats.NATS:
        async with self._connect_lock:
            if self._nc is None:
                self._nc = await nats.connect(
                    self.url,
                    name=self.name,
                    connect_timeout=5,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                )
        return self._nc

    async def js(self) -> JetStreamContext:
        # Short: a request whose reply was lost when NATS went away is given up quickly and
        # sent again by `call`'s patience, instead of blocking a heartbeat past its lease.
        return (await self.nc()).jetstream(timeout=5)

    async def bucket(self, name: str) -> KeyValue:
        """The key-value bucket, created with file storage on first use."""
        if name not in self._buckets:
            js = await self.js()
            try:
                self._buckets[name] = await js.key_value(name)
            except BucketNotFoundError:
                self._buckets[name] = await js.create_key_value(
                    KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE)
                )
        return self._buckets[name]

    async def ensure_stream(self, name: str, subjects: list[str], **config: Any) -> None:
        """Create the stream when it is missing, once per process (every replica may race
        to do so: adding an identical stream is a no-op)."""
        if name in self._streams:
            return
        js = await self.js()
        await js.add_stream(
            StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, **config)
        )
        self._streams.add(name)

    async def publish_json(self, subject: str, payload: dict, msg_id: str | None = None) -> None:
        js = await self.js()
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await js.publish(subject, json.dumps(payload).encode(), headers=headers)

    async def consume(
        self,
        stream: str,
        subjects: list[str],
        durable: str,
        handle: Callable[[Any], Awaitable[None]],
        *,
        ack_wait: float,
        max_deliver: int,
        concurrency: int,
        **stream_config: Any,
    ) -> None:
        """Work through a stream with a durable pull consumer, at most `concurrency` messages
        at a time, for ever: every replica that runs this shares the work. `handle` acks,
        naks or terminates each message itself. A NATS restart is waited out."""
        slots = asyncio.Semaphore(concurrency)

        async def one(msg) -> None:
            try:
                await handle(msg)
            except Exception:
                log.exception("%s: a message failed; it will be delivered again", durable)
            finally:
                slots.release()

        while True:
            try:
                await self.ensure_stream(stream, subjects, **stream_config)
                sub = await (await self.js()).pull_subscribe(
                    subjects[0], durable=durable, stream=stream,
                    config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait,
                                          max_deliver=max_deliver, max_ack_pending=10_000),
                )  # fmt: skip
                while True:
                    await slots.acquire()
                    try:
                        msgs = await sub.fetch(1, timeout=5)
                    except Exception:  # nothing waiting (a timeout), or NATS restarting
                        slots.release()
                        continue
                    for msg in msgs:
                        asyncio.create_task(one(msg))
            except Exception as e:  # NATS away: subscribe again once it is back
                log.warning("%s: %s; subscribing again", durable, e)
                await asyncio.sleep(1)

    def close(self) -> None:
        """Stop whatever runs on the loop (workers), close the connection, stop the loop."""

        async def _close():
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            if self._nc is not None:
                await self._nc.close()

        try:
            self.call(_close, timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
