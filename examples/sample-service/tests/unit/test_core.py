import threading

import pytest

from inventory import InvalidInput, Inventory, NotFound, OutOfStock


@pytest.fixture
def inv() -> Inventory:
    return Inventory()


def test_restock_creates_then_accumulates(inv):
    assert inv.restock("widget", 3) == 3
    assert inv.restock("widget", 2) == 5
    assert inv.get("widget") == 5


def test_take_reduces_stock_and_keeps_empty_item(inv):
    inv.restock("widget", 2)
    assert inv.take("widget", 2) == 0
    assert inv.snapshot() == {"widget": 0}


def test_take_more_than_available_changes_nothing(inv):
    inv.restock("widget", 1)
    with pytest.raises(OutOfStock, match="only 1"):
        inv.take("widget", 2)
    assert inv.get("widget") == 1


def test_unknown_item_is_not_found(inv):
    for action in (inv.get, inv.remove, lambda name: inv.take(name, 1)):
        with pytest.raises(NotFound):
            action("ghost")


def test_remove_deletes_item(inv):
    inv.restock("widget", 1)
    inv.remove("widget")
    assert inv.snapshot() == {}


@pytest.mark.parametrize("quantity", [0, -1, 1.5, "3", None, True])
def test_rejects_non_positive_integer_quantities(inv, quantity):
    with pytest.raises(InvalidInput):
        inv.restock("widget", quantity)


@pytest.mark.parametrize("name", ["", "Widget", "has space", "../etc", "-lead", "x" * 65])
def test_rejects_names_that_are_not_url_slugs(inv, name):
    with pytest.raises(InvalidInput):
        inv.restock(name, 1)


def test_snapshot_is_sorted_copy(inv):
    inv.restock("pear", 1)
    inv.restock("apple", 2)
    snap = inv.snapshot()
    snap["apple"] = 99
    assert list(inv.snapshot().items()) == [("apple", 2), ("pear", 1)]


def test_concurrent_takes_never_oversell(inv):
    inv.restock("widget", 50)
    sold = []

    def buyer():
        for _ in range(20):
            try:
                inv.take("widget", 1)
                sold.append(1)
            except OutOfStock:
                pass

    threads = [threading.Thread(target=buyer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sold) == 50
    assert inv.get("widget") == 0
