"""Inventory rules, kept free of HTTP so they can be tested without a server."""

import re
import threading

# Names end up in URL paths, so restrict them to a slug that never needs escaping.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


class InventoryError(Exception):
    """Base class for errors a client caused; the HTTP layer maps each to a status."""


class InvalidInput(InventoryError):
    pass


class NotFound(InventoryError):
    pass


class OutOfStock(InventoryError):
    pass


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(f"invalid item name {name!r}: use 1-64 of a-z, 0-9 and '-'")


def _check_quantity(quantity: object) -> int:
    # bool is an int subclass; `true` in a JSON body must not count as 1.
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity <= 0:
        raise InvalidInput(f"quantity must be a positive integer, got {quantity!r}")
    return quantity


class Inventory:
    """Stock levels by item name. Safe to share between request-handling threads."""

    def __init__(self) -> None:
        self._stock: dict[str, int] = {}
        # ThreadingHTTPServer handles requests concurrently; a check-then-update such
        # as take() must not interleave with another request.
        self._lock = threading.Lock()

    def restock(self, name: str, quantity: object) -> int:
        """Add stock, creating the item if needed; returns the new level."""
        _check_name(name)
        quantity = _check_quantity(quantity)
        with self._lock:
            self._stock[name] = self._stock.get(name, 0) + quantity
            return self._stock[name]

    def take(self, name: str, quantity: object) -> int:
        """Remove stock; all or nothing. Returns the new level (an item may sit at 0)."""
        _check_name(name)
        quantity = _check_quantity(quantity)
        with self._lock:
            available = self._level(name)
            if quantity > available:
                raise OutOfStock(f"only {available} of {name!r} in stock, asked for {quantity}")
            self._stock[name] = available - quantity
            return self._stock[name]

    def get(self, name: str) -> int:
        _check_name(name)
        with self._lock:
            return self._level(name)

    def remove(self, name: str) -> None:
        _check_name(name)
        with self._lock:
            self._level(name)
            del self._stock[name]

    def snapshot(self) -> dict[str, int]:
        """A sorted copy, so callers never see (or mutate) the live dict."""
        with self._lock:
            return dict(sorted(self._stock.items()))

    def _level(self, name: str) -> int:
        try:
            return self._stock[name]
        except KeyError:
            raise NotFound(f"no item named {name!r}") from None
