"""A tiny in-memory JSON inventory service (standard library only)."""

from inventory.core import InvalidInput, Inventory, InventoryError, NotFound, OutOfStock

__all__ = ["InvalidInput", "Inventory", "InventoryError", "NotFound", "OutOfStock"]
