"""The month-to-date spend counter (faasci.costs.add_spend) and the alert claims on a real
NATS server: concurrent attempts all count, and each threshold is claimed once."""

import threading

import pytest

from faasci import costs, once, services


@pytest.fixture
def bus(nats_bus, monkeypatch):
    """faasci.services.bus() is this test's own NATS server."""
    monkeypatch.setattr(services, "bus", lambda: nats_bus)
    return nats_bus


def test_concurrent_attempts_each_add_their_cost_once(bus):
    """Eight attempts ending at once: the counter starts from the reckoned spend (which
    holds the first one's cost) and every other cost is added, none lost to a race."""
    reckoned, barrier, totals = [], threading.Barrier(8), []

    def reckon() -> float:
        reckoned.append(1)
        return 1.0

    def attempt() -> None:
        barrier.wait()
        totals.append(costs.add_spend("svc", "2026-11", 0.5, reckon))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(totals) == pytest.approx(1.0 + 7 * 0.5)
    assert sorted(totals) == pytest.approx([1.0 + n * 0.5 for n in range(8)])
    # another service, another month: counters of their own
    assert costs.add_spend("svc", "2026-12", 0.5, lambda: 0.25) == 0.25
    assert costs.add_spend("web", "2026-11", 0.5, lambda: 2.0) == 2.0


def test_each_threshold_of_a_month_is_claimed_once(bus):
    """The alert claims: one winner per service, month and threshold, across callers."""
    key = costs.alert_key("svc", "2026-11", 0.8)
    wins = [once.claim(costs.ALERTS_BUCKET, key, costs.KEEP_S) for _ in range(3)]
    assert wins == [True, False, False]
    assert once.claim(costs.ALERTS_BUCKET, costs.alert_key("svc", "2026-11", 1.0), costs.KEEP_S)
    assert once.claim(costs.ALERTS_BUCKET, costs.alert_key("svc", "2026-12", 0.8), costs.KEEP_S)
    once.release(costs.ALERTS_BUCKET, key, costs.KEEP_S)  # not delivered: raised again later
    assert once.claim(costs.ALERTS_BUCKET, key, costs.KEEP_S)
