"""Run the real server as `python -m inventory` and talk to it over HTTP."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# The code under test: the checkout, or (INVENTORY_APP) the copy an image holds.
SERVICE_ROOT = Path(os.environ.get("INVENTORY_APP") or Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def base_url():
    proc = subprocess.Popen(
        [sys.executable, "-m", "inventory", "--host", "127.0.0.1", "--port", "0"],
        cwd=SERVICE_ROOT,
        env={**os.environ, "APP_ENV": "test"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The server prints its bound address as the first line once the socket is open.
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), f"unexpected first line {url!r}"
        yield url
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, "server did not shut down cleanly on SIGTERM"
        proc.stdout.close()


def call(base_url, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base_url + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def test_health_reports_env(base_url):
    assert call(base_url, "GET", "/health") == (200, {"status": "ok", "env": "test"})


def test_item_lifecycle(base_url):
    assert call(base_url, "POST", "/items/bolt/restock", {"quantity": 5}) == (
        200,
        {"name": "bolt", "quantity": 5},
    )
    assert call(base_url, "POST", "/items/bolt/take", {"quantity": 2})[1]["quantity"] == 3
    assert call(base_url, "GET", "/items") == (200, {"items": {"bolt": 3}})
    assert call(base_url, "DELETE", "/items/bolt") == (204, None)
    assert call(base_url, "GET", "/items/bolt")[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/nowhere", None, 404),
        ("POST", "/items/nut/take", {"quantity": 1}, 404),
        ("POST", "/items/nut/restock", {"quantity": "lots"}, 400),
        ("POST", "/items/nut/restock", ["not", "an", "object"], 400),
        ("POST", "/items/BAD%20NAME/restock", {"quantity": 1}, 400),
    ],
)
def test_errors_are_json_with_status(base_url, method, path, body, status):
    code, payload = call(base_url, method, path, body)
    assert code == status
    assert "error" in payload


def test_take_beyond_stock_conflicts(base_url):
    call(base_url, "POST", "/items/gear/restock", {"quantity": 1})
    code, payload = call(base_url, "POST", "/items/gear/take", {"quantity": 2})
    assert (code, payload["error"]) == (409, "only 1 of 'gear' in stock, asked for 2")
