"""The process's clients of the real services, made once from the settings."""

from __future__ import annotations

from functools import cache

from .bus import Bus
from .cache import DependencyCache
from .invoke import Gateway
from .nodecache import NodeCache
from .objects import ObjectStore
from .settings import settings
from .store import RunStore


@cache
def bus() -> Bus:
    return Bus(settings().nats_url, **settings().nats_credentials())


@cache
def run_store() -> RunStore:
    return RunStore(bus())


@cache
def objects() -> ObjectStore:
    return ObjectStore(settings())


@cache
def dependency_cache() -> DependencyCache:
    return DependencyCache(objects())


@cache
def node_cache() -> NodeCache:
    """The node's unpacked caches in front of S3 (shared by the function processes)."""
    s = settings()
    return NodeCache(s.cache_dir, s.cache_max_bytes, dependency_cache())


@cache
def gateway() -> Gateway:
    return Gateway(settings().gateway_url)


def reset() -> None:
    """Forget every client (after the settings change)."""
    for made in (bus, run_store, objects, dependency_cache, node_cache, gateway):
        made.cache_clear()
