"""Once-only claims: the first caller to claim a key in a NATS JetStream key-value bucket
wins, atomically across every replica (KV create fails when the key exists). Entries
expire with the bucket's TTL, so the bucket stays small.

Used for webhook delivery ids (a replayed delivery starts nothing) and for the scheduled
rounds (one per slot per function).
"""

from __future__ import annotations

import uuid

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from . import services

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
