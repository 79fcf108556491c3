"""Once-only claims: the first caller to claim a key in a NATS JetStream key-value bucket
wins, atomically across every replica (KV create fails when the key exists). Entries
expire with the bucket's TTL, so the bucket stays small.

Used for webhook delivery ids (a replayed delivery starts nothing) and for the scheduled
rounds (one per slot per function); `held` makes a claim a lock (one rollout per target).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from . import services

log = logging.getLogger("faasci.once")

PATIENCE_S = 30


def claim(bucket: str, key: str, ttl_s: float) -> bool:
    """True for the one caller that claims `key` first (within the TTL); False for every
    other. A claim whose reply was lost and that is sent again still counts as ours."""
    token = uuid.uuid4().hex.encode()

    async def _claim() -> bool:
        kv = await services.bus().bucket(bucket, ttl=ttl_s)
        try:
            await kv.create(key, token)
        except KeyWrongLastSequenceError:
            try:
                return (await kv.get(key)).value == token  # our own earlier try went through
            except KeyNotFoundError:  # expired meanwhile: claim it again
                return await _claim()
        return True

    return services.bus().call(_claim, patience=PATIENCE_S)


def release(bucket: str, key: str, ttl_s: float) -> None:
    """Give a claim up (what it guarded did not happen after all): the key may be claimed
    again."""

    async def _release() -> None:
        kv = await services.bus().bucket(bucket, ttl=ttl_s)
        await kv.delete(key)

    services.bus().call(_release, patience=PATIENCE_S)


class NotHeld(Exception):
    """The key stayed claimed by another until the wait ran out (or was cancelled)."""


@contextlib.contextmanager
def held(bucket: str, key: str, ttl_s: float, wait_s: float, cancel: threading.Event,
         waiting: Callable[[], None] = lambda: None) -> Iterator[None]:  # fmt: skip
    """Run the block holding `key`, across every replica: claimed once free (`waiting` is
    called once when it is not), released after. A holder that died frees it with the
    bucket's TTL."""
    deadline = time.monotonic() + wait_s
    told = False
    while not claim(bucket, key, ttl_s):
        if not told:
            waiting()
            told = True
        if time.monotonic() >= deadline or cancel.wait(1):
            raise NotHeld(f"{key} stayed taken for {wait_s:.0f}s")
    try:
        yield
    finally:
        try:
            release(bucket, key, ttl_s)
        except Exception as e:  # what the block did stands; the TTL frees the key
            log.warning("releasing %s/%s failed: %s", bucket, key, e)
