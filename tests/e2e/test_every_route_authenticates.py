"""Every route of every function of stack.yml, called through the test stack's gateway
without credentials or with credentials that must not do, answers 401/403 and starts
nothing. The routes are read from the functions' own Routers, so a new route (or a new
function) is walked as soon as it exists, and a function without a Router fails here."""

from __future__ import annotations

import importlib.util
import time

import pytest
import requests
from conftest import ROOT

from faasci import auth
from faasci import stack as stack_file
from faasci.api import Router

FUNCTIONS = stack_file.load(ROOT / "stack.yml", env={}).functions
# Values for a route's parameters: well-formed, so only authentication can stop the call.
PARAMS = {"run_id": "20260101-000000-abcdef", "stage": "unit", "attempt": "1"}


def load_router(name: str) -> Router:
    """functions/<name>/handler.py's `handle`, imported as the template does (the handler
    module with the library on the path); the timers worker is not started here."""
    from faasci import timers_service

    start, timers_service.start = timers_service.start, lambda: type("W", (), {"fired": 0})()
    try:
        path = ROOT / FUNCTIONS[name].handler / "handler.py"
        spec = importlib.util.spec_from_file_location(f"handler_of_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        timers_service.start = start
    return module.handle


ROUTERS = {name: load_router(name) for name in FUNCTIONS}


def test_every_function_is_a_router_with_routes():
    for name, router in ROUTERS.items():
        assert isinstance(router, Router), f"{name}: handle is not a faasci.api.Router"
        assert router.name == name and router.routes, name
        for route in router.routes:
            assert route.role in auth.ROUTE_ROLES, (name, route)


def route_cases():
    for name, router in ROUTERS.items():
        for route in router.routes:
            path = route.pattern
            for param in route.regex.groupindex:
                path = path.replace(f"<path:{param}>", "a/b").replace(
                    f"<{param}>", PARAMS.get(param, "x")
                )
            yield pytest.param(name, route, path.strip("/"), id=f"{name} {route.method} {path}")


def claims(stack, **changes) -> dict:
    now = int(time.time())
    base = {"iss": stack.oidc_issuer, "aud": "faasci", "sub": "mallory", "iat": now,
            "exp": now + 600, "roles": ["admin"]}  # fmt: skip
    return {**base, **changes}


def bad_credentials(stack, token, route) -> dict[str, tuple[dict, tuple[int, ...]]]:
    """What to send, and the statuses it may get: admin tokens with one defect each (signed
    with the provider's real key), a forged signature, and tokens without the role."""
    from faasci.local import oidc

    def bearer(value):
        return {"Authorization": f"Bearer {value}"}

    now = int(time.time())
    cases = {
        "none": ({}, (401,)),
        "expired": (bearer(oidc.sign(stack, claims(stack, iat=now - 7200, exp=now - 3600))),
                    (401,)),
        "other issuer": (bearer(oidc.sign(stack, claims(stack, iss="https://idp.example"))),
                         (401,)),
        "wrong audience": (bearer(oidc.sign(stack, claims(stack, aud="another-api"))), (401,)),
        "not a bearer": ({"Authorization": "Basic YWRtaW46YWRtaW4="}, (401,)),
        "forged signature": ({auth.SIGNATURE_HEADER: auth.sign(
            route.method, "/x", b"{}", "not-the-key", "unit")}, (401,)),
        "forged link": ({}, (401,)),
    }  # fmt: skip
    lacking = {"viewer": ["none"], "runner": ["none", "viewer"], "admin": ["viewer", "runner"],
               "internal": ["admin"]}  # fmt: skip
    for role in lacking.get(route.role, []):
        cases[f"role {role}"] = (bearer(token(role)), (403,))
    if route.role == "webhook":  # the git host's signature is missing in every case: 401
        cases = {k: (headers, (401,)) for k, (headers, _) in cases.items()}
    return cases


def run_count(gateway) -> int:
    return len(gateway.call("runs", method="GET", query={"limit": 500}).json()["runs"])


@pytest.mark.parametrize("name, route, path", list(route_cases()))
def test_every_route_refuses_callers_without_valid_credentials_and_starts_nothing(
    stack, gateway, token, sample_repo, name, route, path
):
    before = run_count(gateway)
    # A body that would do something if it got through: start a run, purge everything.
    body = {"repo": str(sample_repo), "all": True, "run_id": PARAMS["run_id"]}
    url = f"{stack.gateway_url}/function/{name}/{path}"
    for case, (headers, statuses) in bad_credentials(stack, token, route).items():
        query = {"sig": f"{int(time.time()) + 3600}.{'0' * 64}"} if case == "forged link" else {}
        resp = requests.request(route.method, url, json=body, headers=headers, params=query,
                                timeout=60)  # fmt: skip
        assert resp.status_code in statuses, (case, resp.status_code, resp.text)
        assert resp.json()["error"], case
        if resp.status_code == 401 and route.role != "webhook":
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), case
    assert run_count(gateway) == before


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_an_unknown_path_is_401_to_a_stranger_and_404_to_a_viewer(stack, token, name):
    url = f"{stack.gateway_url}/function/{name}/no/such/route"
    assert requests.delete(url, timeout=30).status_code == 401
    viewer = {"Authorization": f"Bearer {token('viewer')}"}
    assert requests.delete(url, headers=viewer, timeout=30).status_code == 404


@pytest.mark.parametrize("name", sorted(n for n, r in ROUTERS.items() if r.on_schedule))
def test_a_scheduled_round_needs_the_scheduler_or_an_admin(stack, gateway, token, name):
    """A cron request carrying credentials is judged by them: a runner's token or a forged
    signature runs nothing."""
    before = run_count(gateway)
    cron = {"X-Connector": "cron-connector", "X-Topic": "cron-function"}
    url = f"{stack.gateway_url}/function/{name}"
    runner = requests.post(url, headers={**cron, "Authorization": f"Bearer {token('runner')}"},
                           timeout=60)  # fmt: skip
    assert runner.status_code == 403, runner.text
    forged = auth.sign("POST", f"/{name}", b"", "not-the-key", "webhook")
    resp = requests.post(url, headers={**cron, auth.SIGNATURE_HEADER: forged}, timeout=60)
    assert resp.status_code == 401, resp.text
    assert run_count(gateway) == before


def test_the_right_roles_get_through(stack, gateway, token):
    """The other side: a viewer reads runs, a runner starts none with a bad body (400, past
    authentication), an admin lists cache entries."""
    url = stack.gateway_url

    def as_(role):
        return {"Authorization": f"Bearer {token(role)}"}

    assert requests.get(f"{url}/function/runs", headers=as_("viewer"), timeout=30).ok
    resp = requests.post(f"{url}/function/runs", json={}, headers=as_("runner"), timeout=30)
    assert resp.status_code == 400 and resp.json()["field"] == "repo"
    resp = requests.get(f"{url}/function/cache-invalidator", headers=as_("admin"), timeout=30)
    assert resp.status_code == 200 and "entries" in resp.json()


def test_signed_hand_offs_carry_a_run_and_its_log_link_opens_without_a_token(gateway, sample_repo):
    """Past the first stage every step is a function's signed call (through the async
    queue); the log link a chat message carries opens for a person with no token, and only
    for its own attempt."""
    from conftest import wait_for_run

    run = wait_for_run(gateway, gateway.call("runs", {"repo": str(sample_repo)}).json()["id"])
    assert run["status"] == "passed", run
    link = run["stages"][1]["attempts"][0]["log"]
    assert requests.get(link, timeout=30).status_code == 200
    base, _, sig = link.partition("?sig=")
    expiry, _, mac = sig.partition(".")
    for bad in (base, f"{base}?sig={expiry}.{mac[::-1]}", f"{base}?sig={int(expiry) + 1}.{mac}",
                f"{base[:-1]}2?sig={sig}"):  # fmt: skip
        resp = requests.get(bad, timeout=30)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"], bad
