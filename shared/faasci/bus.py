"""NATS and JetStream for synchronous code.

Function handlers run in waitress's worker threads, while nats-py is asyncio. One event
loop per process runs in a daemon thread and owns the connection; `Bus.call` runs a
coroutine there and waits for it. The connection reconnects forever, so a restarted NATS
server is a pause, not an error; but a NATS that has not answered for longer than a restart
takes (or never answered) makes calls fail at once with NatsUnreachable, which callers
answer with 503 naming NATS_URL, instead of holding every request for minutes.
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
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

T = TypeVar("T")
log = logging.getLogger("faasci.bus")

CONNECT_WAIT_S = 3  # a process's first connection: NATS answers within this or is down
OUTAGE_WAIT_S = 15  # after a lost connection: a restart takes a few seconds; wait that out


async def compare_and_set(
    kv: KeyValue, key: str, change: Callable[[bytes | None], tuple[bytes | None, T]]
) -> T:
    """Read `key`, apply `change` to its value (None when absent) and write the bytes it
    returns (nothing when None) unless someone wrote the key meanwhile; then read and apply
    again. So `change` may run more than once: it must not act, only compute. Its result."""
    while True:
        try:
            entry = await kv.get(key)
            value, revision = entry.value, entry.revision
        except KeyNotFoundError:
            value, revision = None, None
        data, result = change(value)
        if data is None:
            return result
        try:
            if revision is None:
                await kv.create(key, data)
            else:
                await kv.update(key, data, last=revision)
        except KeyWrongLastSequenceError:
            continue
        return result


class NatsUnreachable(Exception):
    """No connection to NATS, for longer than a restart takes: nothing to wait for."""

    setting = "NATS_URL"

    def __init__(self, url: str):
        super().__init__(f"NATS at {url} ({self.setting}) is unreachable")


def transient(error: BaseException) -> bool:
    """May the same call succeed a little later? True for everything a restarting NATS
    server or a JetStream not yet ready raises (timeouts, EOFs, no responders, refused
    connections); false for JetStream's answers about the request itself."""
    if isinstance(error, APIError):
        return isinstance(error, ServiceUnavailableError)
    return isinstance(error, nats.errors.Error | OSError)  # TimeoutError is an OSError


class Bus:
    def __init__(self, url: str, name: str = "faasci", user: str | None = None,
                 password: str | None = None):  # fmt: skip
        """`user` and `password`: NATS credentials (settings: NATS_USER and the secret
        `nats-token`); None for a NATS that asks for none."""
        self.url = url
        self.name = name
        self._credentials = {"user": user, "password": password} if password else {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats", daemon=True)
        self._thread.start()
        self._nc: nats.NATS | None = None  # set once the first connection is made
        self._connecting: asyncio.Task | None = None
        self._up: asyncio.Event | None = None  # made on the loop: set while connected
        self._down_since = 0.0  # when the connection was lost (or first tried)
        self.up_since = time.monotonic()  # when NATS was last (re)connected (monotonic)
        self._last_error: BaseException | None = None
        self._reported = False  # "unreachable" logged once per outage, not per attempt
        self._closing = False
        self._buckets: dict[str, KeyValue] = {}
        self._streams: set[str] = set()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = 60,
             patience: float = 0) -> T:  # fmt: skip
        """Run `fn(*args)` on the bus's loop and wait for its result. With `patience`, a
        transient failure is tried again (fn must be safe to repeat) for that many seconds,
        unless NATS has been away for longer than a restart takes (NatsUnreachable)."""
        deadline = time.monotonic() + patience
        wait = 0.2
        while True:
            future = asyncio.run_coroutine_threadsafe(self._connected(fn, args), self._loop)
            try:
                return future.result(timeout)
            except Exception as e:
                future.cancel()  # given up: it must not go on (and write) later
                if not transient(e) or time.monotonic() + wait > deadline:
                    raise
                log.warning("NATS: %s; trying again in %.1fs", type(e).__name__, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5)

    async def _connected(self, fn: Callable[..., Awaitable[T]], args: tuple) -> T:
        # Checked before every try: cached buckets and streams hold the connection, so
        # `fn` itself may never ask for it and would only time out, again and again.
        await self.nc()
        return await fn(*args)

    def connected(self, wait: float = 1) -> bool:
        """Is NATS connected now, or within `wait` seconds? (Readiness probes ask this.)"""
        try:
            asyncio.run_coroutine_threadsafe(self.nc(wait), self._loop).result(wait + 1)
        except (NatsUnreachable, TimeoutError):
            return False
        return True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def nc(self, wait: float | None = None) -> nats.NATS:
        """The connection, once NATS answers. The first call starts connecting (in the
        background, for ever). While NATS is away a call waits for it `wait` seconds, or by
        default until CONNECT_WAIT_S or OUTAGE_WAIT_S of silence, then raises NatsUnreachable."""
        if self._up is None:
            self._up = asyncio.Event()
        if self._connecting is None or (self._connecting.done() and self._nc is None):
            self._down_since = time.monotonic()
            self._connecting = asyncio.ensure_future(self._connect())
        if not self._up.is_set():
            limit = OUTAGE_WAIT_S if self._nc is not None else CONNECT_WAIT_S
            left = max(0.0, self._down_since + limit - time.monotonic())
            try:
                await asyncio.wait_for(self._up.wait(), left if wait is None else wait)
            except TimeoutError:
                if time.monotonic() >= self._down_since + limit and not self._reported:
                    self._reported = True
                    log.warning("NATS at %s is unreachable (%s); calls fail until it is back",
                                self.url, self._last_error or "no answer")  # fmt: skip
                raise NatsUnreachable(self.url) from None
        return self._nc

    async def _connect(self) -> None:
        try:
            nc = await nats.connect(
                self.url,
                name=self.name,
                connect_timeout=2,
                max_reconnect_attempts=-1,  # the first connection too: NATS may start later
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=self._on_error,
                disconnected_cb=self._on_down,
                reconnected_cb=self._on_up,
                **self._credentials,
            )
        except Exception as e:  # a bad URL, refused credentials: the next call tries again
            self._last_error = e
            log.warning("NATS at %s: cannot connect: %s", self.url, e)
            return
        self._nc = nc
        await self._on_up()

    # nats-py reports every failed reconnect attempt (twice a second) to error_cb; its
    # default logs a traceback for each. Keep the last one; log only changes of state.
    async def _on_error(self, e: Exception) -> None:
        self._last_error = e
        log.debug("NATS at %s: %s", self.url, e)

    async def _on_down(self) -> None:
        if self._up.is_set() and not self._closing:
            log.warning("NATS at %s: connection lost; reconnecting", self.url)
        self._up.clear()
        self._down_since = time.monotonic()

    async def _on_up(self) -> None:
        log.info("NATS at %s: connected", self.url)
        self._reported = False
        self.up_since = time.monotonic()
        self._up.set()

    async def js(self) -> JetStreamContext:
        # Short: a request whose reply was lost when NATS went away is given up quickly and
        # sent again by `call`'s patience, instead of blocking a heartbeat past its lease.
        return (await self.nc()).jetstream(timeout=5)

    async def bucket(self, name: str, ttl: float | None = None) -> KeyValue:
        """The key-value bucket, created with file storage on first use; with `ttl`, its
        entries expire that many seconds after they were written."""
        if name not in self._buckets:
            js = await self.js()
            try:
                self._buckets[name] = await js.key_value(name)
            except BucketNotFoundError:
                self._buckets[name] = await js.create_key_value(
                    KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE, ttl=ttl)
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
                if not isinstance(e, NatsUnreachable):  # (the bus logs that once, not per try)
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
                self._closing = True
                await self._nc.close()

        try:  # not through `call`: closing needs no connection
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
