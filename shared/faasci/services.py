"""The process's clients of the real services, made once from the settings."""

from __future__ import annotations

from functools import cache

from .bus import Bus
from .cache import DependencyCache
from .invoke import Gateway
from .objects import ObjectStore
from .settings import settings
from .store import RunStore


@cache
def bus() -> Bus:
    return Bus(settings().nats_url)


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
def gateway() -> Gateway:
    return Gateway(settings().gateway_url)


def reset() -> None:
    """Forget every client (after the settings change)."""
    for made in (bus, run_store, objects, dependency_cache, gateway):
        made.cache_clear()
