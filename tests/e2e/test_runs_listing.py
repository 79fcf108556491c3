"""`GET /function/runs` never lies: under load every answer is the whole list, and it pages
by a cursor and filters by service."""

import secrets
from concurrent.futures import ThreadPoolExecutor

from conftest import wait_for_run


def test_200_concurrent_listings_all_return_the_full_list(gateway, make_repo):
    """Known runs first; then 200 listings, 50 at a time: each the same ids as a reference
    listing, never an empty or partial one. Paged by `before` and filtered by `service`,
    the same runs."""
    service = f"listing-{secrets.token_hex(3)}"
    repo = make_repo({".faasci.yml": f'service: {service}\nstages:\n  lint: {{run: ["true"]}}\n'})
    known = []
    for _ in range(8):
        started = gateway.call("runs", {"repo": str(repo)})
        assert started.status_code == 201, started.text
        known.append(started.json()["id"])
    for run_id in known:
        assert wait_for_run(gateway, run_id)["status"] == "passed"

    def listing() -> list[str]:
        resp = gateway.call("runs", method="GET", query={"limit": 500})
        assert resp.status_code == 200, resp.text
        return [r["id"] for r in resp.json()["runs"]]

    reference = listing()
    assert set(known) <= set(reference) and reference == sorted(reference, reverse=True)
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: listing(), range(200)))
    # Each holds every run of the reference, newest first. It may hold more: the session's
    # stack goes on meanwhile (a schedule, a retry), and a run started then is listed too.
    wrong = [len(ids) for ids in answers
             if not set(reference) <= set(ids) or ids != sorted(ids, reverse=True)]  # fmt: skip
    assert wrong == [], (
        f"{len(wrong)} of 200 listings lack runs (lengths {wrong[:10]}, reference {len(reference)})"
    )

    pages, before = [], None
    while True:
        query = {"limit": 3, "service": service, **({"before": before} if before else {})}
        body = gateway.call("runs", method="GET", query=query).json()
        pages += [r["id"] for r in body["runs"]]
        assert all(r["service"] == service for r in body["runs"])
        if not (before := body["next"]):
            break
    assert pages == sorted(known, reverse=True)
    bad = gateway.call("runs", method="GET", query={"before": "yesterday"})
    assert bad.status_code == 400 and bad.json()["field"] == "run_id"
