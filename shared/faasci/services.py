"""The process's clients of the real services, made once from the settings.

Each client's module is imported when the client is first made: a function that never
touches S3 never loads boto3 (a start costs what its first request needs, no more)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from .settings import settings

if TYPE_CHECKING:
    from .bus import Bus
    from .cache import DependencyCache
    from .invoke import Gateway
    from .nodecache import NodeCache
    from .objects import ObjectStore
    from .store import RunStore


@cache
def bus() -> Bus:
    from .bus import Bus

    return Bus(settings().nats_url, **settings().nats_credentials())


@cache
def run_store() -> RunStore:
    from .store import RunStore

    return RunStore(bus())


@cache
def objects() -> ObjectStore:
    from .objects import ObjectStore

    return ObjectStore(settings())


@cache
def dependency_cache() -> DependencyCache:
    from .cache import DependencyCache

    return DependencyCache(objects())


@cache
def node_cache() -> NodeCache:
    """The node's unpacked caches in front of S3 (shared by the function processes)."""
    from .nodecache import NodeCache

    s = settings()
    return NodeCache(s.cache_dir, s.cache_max_bytes, dependency_cache())


@cache
def gateway() -> Gateway:
    from .invoke import Gateway

    return Gateway(settings().gateway_url, trust_env=False)


def reset() -> None:
    """Forget every client (after the settings change)."""
    for made in (bus, run_store, objects, dependency_cache, node_cache, gateway):
        made.cache_clear()
