"""faasci.auth and faasci.api.Router: internal signatures, signed links, OIDC bearer tokens
checked against a JWKS served over HTTP by the test (keys made here), roles, and the
router's order (who is calling, then which route, then the role)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from oidc_issuer import Issuer, rsa_key
from requests.structures import CaseInsensitiveDict

from faasci import auth, jsonlog
from faasci.api import Route, Router
from faasci.auth import OIDCConfig, Principal, Unauthorized

KEY, OLD_KEY = "k" * 32, "o" * 32


class Event:
    """The template's Event, as the router reads it."""

    def __init__(self, method="GET", path="/", body=b"", headers=None, query=None):
        self.method, self.path, self.body = method, path, body
        self.headers = CaseInsensitiveDict(headers or {})
        self.query = query or {}


# Internal signatures.


def signed(method="POST", path="/unit", body=b'{"run_id": "x"}', key=KEY, now=None):
    return auth.sign(method, path, body, key, "runs", now=now)


def test_a_signature_names_its_caller():
    assert auth.verify_signature(signed(), "POST", "/unit", b'{"run_id": "x"}', [KEY]) == "runs"


@pytest.mark.parametrize(
    "method, path, body, keys",
    [
        ("POST", "/unit", b'{"run_id": "y"}', [KEY]),  # another body
        ("POST", "/lint", b'{"run_id": "x"}', [KEY]),  # another function: no replay there
        ("GET", "/unit", b'{"run_id": "x"}', [KEY]),  # another method
        ("POST", "/unit", b'{"run_id": "x"}', ["w" * 32]),  # another key
        ("POST", "/unit", b'{"run_id": "x"}', []),  # no key at all
    ],
)
def test_a_signature_for_anything_else_is_refused(method, path, body, keys):
    with pytest.raises(Unauthorized) as caught:
        auth.verify_signature(signed(), method, path, body, keys)
    assert caught.value.status == 401 and caught.value.field == auth.SIGNATURE_HEADER


def test_the_previous_key_is_accepted_during_its_overlap():
    header = signed(key=OLD_KEY)
    assert auth.verify_signature(header, "POST", "/unit", b'{"run_id": "x"}', [KEY, OLD_KEY])


def test_a_queued_call_may_wait_a_day_but_not_longer_nor_come_from_the_future():
    now = time.time()
    body = b'{"run_id": "x"}'
    day_old = signed(now=now - auth.MAX_AGE_S + 60)
    assert auth.verify_signature(day_old, "POST", "/unit", body, [KEY], now=now) == "runs"
    for header in (signed(now=now - auth.MAX_AGE_S - 1), signed(now=now + 120)):
        with pytest.raises(Unauthorized, match="expired or from the future"):
            auth.verify_signature(header, "POST", "/unit", body, [KEY], now=now)


@pytest.mark.parametrize("header", ["", "v1=abc", "t=now,fn=runs,v1=ab", "t=1,fn=,v1=ab"])
def test_a_malformed_signature_header_is_refused(header):
    with pytest.raises(Unauthorized, match="must be t=<unix time>"):
        auth.verify_signature(header, "POST", "/unit", b"", [KEY])


def test_canonical_path_is_the_same_on_both_ends():
    assert (
        auth.canonical_path("runs", "") == auth.canonical_path("runs.openfaas-fn", "/") == "/runs"
    )
    assert auth.canonical_path("runs", "/x/cancel/") == auth.canonical_path("runs", "x/cancel")


# OIDC bearer tokens against a JWKS served here (tests/oidc_issuer.py).


@pytest.fixture(scope="module")
def issuer():
    made = Issuer()
    yield made
    made.server.shutdown()


def test_a_good_token_is_its_subject_with_its_roles(issuer):
    principal = auth.verify_token(issuer.token(), issuer.config)
    assert principal == Principal("alice", "user", frozenset({"runner"}))
    assert principal.actor == "user:alice"


def test_a_token_that_checked_out_is_believed_a_minute_never_past_its_exp(issuer, monkeypatch):
    """A token seen valid is not checked again (it costs ~6 ms of CPU) for VERIFIED_S, nor
    past its exp; under another configuration it is checked anew."""
    checked, check = [], auth._check_token
    monkeypatch.setattr(auth, "_check_token", lambda t, c: checked.append(t) or check(t, c))
    now = time.time()
    token, brief = issuer.token(exp=int(now) + 3600), issuer.token(exp=int(now) + 5)
    for _ in range(3):
        assert auth.verify_token(token, issuer.config).subject == "alice"
        assert auth.verify_token(brief, issuer.config).subject == "alice"
    assert checked == [token, brief]
    with pytest.raises(Unauthorized):
        auth.verify_token(token, OIDCConfig(issuer=issuer.url, audience="another"))
    assert checked == [token, brief, token]
    monkeypatch.setattr(auth.time, "time", lambda: now + 6)  # past brief's exp
    auth.verify_token(token, issuer.config)
    auth.verify_token(brief, issuer.config)  # (PyJWT's own clock says it is still valid)
    assert checked == [token, brief, token, brief]
    monkeypatch.setattr(auth.time, "time", lambda: now + auth.VERIFIED_S + 1)
    auth.verify_token(token, issuer.config)
    assert checked == [token, brief, token, brief, token]


@pytest.mark.parametrize(
    "claim, roles, expected",
    [
        ("roles", "viewer admin", {"viewer", "admin"}),  # a space-separated string
        ("roles", ["runner", "superuser", 7], {"runner"}),  # unknown ones are ignored
        ("realm_access.roles", None, {"admin"}),  # a dotted claim (Keycloak's form)
        ("roles", None, set()),
    ],
)
def test_roles_come_from_the_configured_claim(issuer, claim, roles, expected):
    token = issuer.token(roles=roles, realm_access={"roles": ["admin"]})
    config = OIDCConfig(issuer=issuer.url, roles_claim=claim)
    assert auth.verify_token(token, config).roles == expected


def test_clock_skew_within_the_leeway_is_tolerated(issuer):
    now = int(time.time())
    auth.verify_token(issuer.token(exp=now - 10, nbf=now + 10), issuer.config)


@pytest.mark.parametrize(
    "claims, words",
    [
        ({"exp": -120}, "expired"),  # seconds from now (parameters are made at collection)
        ({"nbf": 120}, "not valid yet"),
        ({"aud": "someone-else"}, "audience"),
        ({"aud": None}, "'aud'"),
        ({"exp": None}, "'exp'"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"sub": None}, "no subject"),
    ],
)
def test_a_token_that_does_not_check_out_is_401(issuer, claims, words):
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") and v is not None else v
              for k, v in claims.items()}  # fmt: skip
    with pytest.raises(Unauthorized, match=words) as caught:
        auth.verify_token(issuer.token(**claims), issuer.config)
    assert caught.value.headers["WWW-Authenticate"].startswith('Bearer realm="faasci", error=')


def test_another_issuers_token_never_makes_us_fetch_its_keys(issuer):
    fetches = issuer.fetches
    other = Issuer()
    try:
        with pytest.raises(Unauthorized, match="issuer"):
            auth.verify_token(other.token(), issuer.config)
        assert other.fetches == 0 and issuer.fetches == fetches
    finally:
        other.server.shutdown()


def test_a_token_signed_by_another_key_is_refused(issuer):
    stranger = rsa_key()
    with pytest.raises(Unauthorized, match="does not check out"):  # our kid, not our key
        auth.verify_token(issuer.token(key=stranger), issuer.config)
    with pytest.raises(Unauthorized, match="not one of the issuer's"):  # a kid we do not have
        auth.verify_token(issuer.token(kid="nope", key=stranger), issuer.config)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_alg_none_and_hmac_with_the_public_key_are_refused(issuer):
    claims = {"iss": issuer.url, "aud": "faasci", "sub": "x", "exp": 2**31, "roles": ["admin"]}
    with pytest.raises(Unauthorized, match="algorithm 'none'"):
        auth.verify_token(jwt.encode(claims, None, algorithm="none"), issuer.config)
    # HS256 keyed with the issuer's public key (anyone has it); built by hand, as PyJWT
    # refuses to make one.
    public = (
        issuer.keys["k1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = b64(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
    with pytest.raises(Unauthorized, match="algorithm 'HS256'"):
        auth.verify_token(f"{head}.{body}.{mac}", issuer.config)


def test_keys_from_oidc_jwks_url_skip_discovery(issuer):
    """A container reaches the local provider by another address than its issuer's."""
    config = OIDCConfig.from_env({"OIDC_ISSUER": "http://issuer.invalid/",
                                  "OIDC_JWKS_URL": f"{issuer.url}/jwks"})  # fmt: skip
    token = issuer.token(iss="http://issuer.invalid")
    assert auth.verify_token(token, config).subject == "alice"


def test_a_new_kid_fetches_the_keys_again(issuer):
    auth.verify_token(issuer.token(), issuer.config)  # the client holds k1
    auth.jwks_client(issuer.url).cooldown_duration = 0  # no waiting out the refetch limit
    issuer.keys["k2"] = rsa_key()
    before = issuer.fetches
    assert auth.verify_token(issuer.token(kid="k2"), issuer.config).subject == "alice"
    assert issuer.fetches == before + 1


@pytest.mark.parametrize("header", ["Basic YWRtaW46eA==", "Bearer", "Bearer   ", "Bearer a b",
                                    "Token abc", "abc"])  # fmt: skip
def test_an_authorization_header_not_of_the_bearer_form_is_401(header):
    with pytest.raises(Unauthorized, match="expected Authorization: Bearer"):
        auth.bearer_token(header)
    assert auth.bearer_token("bearer  abc ") == "abc"  # the scheme is case-insensitive


def test_garbage_and_no_issuer_are_401(issuer):
    with pytest.raises(Unauthorized, match="not a JWT"):
        auth.verify_token("not.a.jwt", issuer.config)
    with pytest.raises(Unauthorized, match="OIDC_ISSUER"):
        auth.verify_token(issuer.token(), None)


def test_an_unreachable_issuer_is_503_not_401():
    token = jwt.encode({"iss": "http://127.0.0.1:9"}, rsa_key(), algorithm="RS256")
    with pytest.raises(auth.Unavailable):
        auth.verify_token(token, OIDCConfig(issuer="http://127.0.0.1:9"))


def test_the_role_hierarchy():
    def user(*roles):
        return Principal("u", "user", frozenset(roles))

    assert [user("admin").allows(r) for r in auth.ROLES] == [True, True, True]
    assert [user("runner").allows(r) for r in auth.ROLES] == [True, True, False]
    assert [user("viewer").allows(r) for r in auth.ROLES] == [True, False, False]
    assert [user().allows(r) for r in auth.ROLES] == [False, False, False]
    assert not user("admin").allows("internal")
    function = Principal("unit", "function")
    assert (
        function.allows("internal")
        and function.allows("admin")
        and function.actor == ("function:unit")
    )
    assert not Principal("c", "scheduler").allows("viewer")
    assert Principal("github:octocat", "webhook").actor == "github:octocat"


# The router.


@pytest.fixture
def keys(monkeypatch):
    """The signing keys this process 'holds' (Vault's, in a function)."""
    monkeypatch.setattr(auth, "signing_keys", lambda: [KEY])
    monkeypatch.setattr(auth, "accepted_keys", lambda refresh=False: [KEY, OLD_KEY])


@pytest.fixture
def oidc(issuer, monkeypatch):
    monkeypatch.setenv("OIDC_ISSUER", issuer.url)
    return issuer


def opens(event, thing, rest):
    """A route's own judgement of a link: here, ?sig=ok-<thing>/<rest>."""
    return event.query.get("sig") == f"ok-{thing}/{rest}"


@pytest.fixture
def router():
    seen = []

    def record(name):
        def fn(event, principal, **params):
            seen.append((name, principal, params, auth.actor()))
            return {"route": name, **params}

        return fn

    made = Router("things", [
        Route("GET", "/", "viewer", record("list")),
        Route("POST", "/", "runner", record("start")),
        Route("POST", "/<thing>/cancel", "runner", record("cancel")),
        Route("POST", "/purge", "admin", record("purge")),
        Route("POST", "/hand-off", "internal", record("hand-off")),
        Route("POST", "/hook", "webhook", record("hook")),
        Route("GET", "/<thing>/<path:rest>", "viewer", record("file"), link=opens),
    ], on_schedule=lambda: {"round": auth.actor()})  # fmt: skip
    made.seen = seen
    return made


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_a_route_needs_a_role():
    with pytest.raises(TypeError):
        Route("GET", "/", lambda e, p: None)  # no role: not even constructible
    with pytest.raises(ValueError, match="role 'anyone'"):
        Route("GET", "/", "anyone", lambda e, p: None)
    with pytest.raises(ValueError, match="signed link"):
        Route("POST", "/", "runner", lambda e, p: None, link=opens)


def test_without_credentials_every_path_is_401_even_unknown_ones(router, oidc):
    for method, path in (("GET", "/"), ("POST", "/x/cancel"), ("GET", "/no/such"),
                         ("DELETE", "/nothing"), ("POST", "/hand-off")):  # fmt: skip
        answer = router(Event(method, path))
        assert answer["statusCode"] == 401, (method, path)
        assert answer["headers"]["WWW-Authenticate"] == 'Bearer realm="faasci"'
        assert "Bearer" in answer["body"]["error"]
    assert router.seen == []


def test_a_known_caller_gets_404_for_an_unknown_route(router, oidc):
    answer = router(Event("DELETE", "/x", headers=bearer(oidc.token(roles=["admin"]))))
    assert answer["statusCode"] == 404 and answer["body"]["field"] == "path"


def test_roles_decide_and_the_principal_is_current_while_the_route_runs(router, oidc):
    viewer, runner = bearer(oidc.token(roles=["viewer"])), bearer(oidc.token(roles="runner"))
    assert router(Event("GET", "/", headers=viewer))["statusCode"] == 200
    answer = router(Event("POST", "/", b"{}", headers=viewer))
    assert answer["statusCode"] == 403 and answer["body"]["required_role"] == "runner"
    assert "insufficient_scope" in answer["headers"]["WWW-Authenticate"]
    answer = router(Event("POST", "/abc/cancel", b"{}", headers=runner))
    assert answer == {"statusCode": 200, "body": {"route": "cancel", "thing": "abc"}}
    assert router.seen[-1][2:] == ({"thing": "abc"}, "user:alice")
    assert auth.actor() == "system"  # reset after the request
    assert router(Event("POST", "/purge", headers=runner))["statusCode"] == 403
    none = bearer(oidc.token(roles=None))
    assert router(Event("GET", "/", headers=none))["statusCode"] == 403


def test_a_request_about_a_run_logs_with_its_run_id(oidc, keys):
    """The run a request names (a route's <run_id>, a body's "run_id") is bound to its log
    lines while the route runs; anything not of a run id's form is not."""
    run_id = "20261128-010203-abcdef"
    seen = []
    about = Router("things", [
        Route("GET", "/<run_id>", "viewer", lambda e, p, run_id: seen.append(jsonlog.bound())),
        Route("POST", "/", "runner", lambda e, p: seen.append(jsonlog.bound())),
    ])  # fmt: skip
    viewer = bearer(oidc.token(roles=["runner"]))
    body = json.dumps({"run_id": run_id}).encode()
    assert about(Event("GET", f"/{run_id}", headers=viewer))["statusCode"] == 200
    signed_body = {auth.SIGNATURE_HEADER: auth.sign("POST", "/things", body, KEY, "unit")}
    assert about(Event("POST", "/", body, headers=signed_body))["statusCode"] == 200
    for other in (b'{"run_id": "../etc"}', b"[1]", b"{not json", b"[" * 5000 + b"]" * 5000):
        assert about(Event("POST", "/", other, headers=viewer))["statusCode"] == 200
    assert seen == [{"run_id": run_id}] * 2 + [{}] * 4
    assert jsonlog.bound() == {}


def test_internal_routes_take_only_a_signature(router, oidc, keys):
    admin = bearer(oidc.token(roles=["admin"]))
    assert router(Event("POST", "/hand-off", b"{}", headers=admin))["statusCode"] == 403
    body = b'{"run_id": "r"}'
    good = auth.sign("POST", "/things/hand-off", body, KEY, "unit")
    answer = router(Event("POST", "/hand-off", body, headers={auth.SIGNATURE_HEADER: good}))
    assert answer["statusCode"] == 200 and router.seen[-1][3] == "function:unit"
    forged = auth.sign("POST", "/things/hand-off", body, "f" * 32, "unit")
    answer = router(Event("POST", "/hand-off", body, headers={auth.SIGNATURE_HEADER: forged}))
    assert answer["statusCode"] == 401
    # A signature is for one request: not another body, nor another function's path.
    other = router(Event("POST", "/hand-off", b"{}", headers={auth.SIGNATURE_HEADER: good}))
    assert other["statusCode"] == 401


def test_a_webhook_route_is_reached_without_credentials(router):
    assert router(Event("POST", "/hook", b"{}"))["body"] == {"route": "hook"}
    assert router.seen[-1][1] is None and router.seen[-1][3] == "system"


def test_a_link_opens_only_what_its_route_vouches_for(router):
    answer = router(Event("GET", "/r1/unit/1", query={"sig": "ok-r1/unit/1"}))
    assert answer["body"] == {"route": "file", "thing": "r1", "rest": "unit/1"}
    assert router.seen[-1][1] == Principal("/things/r1/unit/1", "link")
    answer = router(Event("GET", "/r1/unit/2", query={"sig": "ok-r1/unit/1"}))
    assert answer["statusCode"] == 401 and answer["body"]["field"] == "sig"
    assert router(Event("GET", "/", query={"sig": "ok-r1/unit/1"}))["statusCode"] == 401


@pytest.fixture
def schedule(monkeypatch):
    """faasci.schedule with `due` answering what the test sets."""
    fake = types.ModuleType("faasci.schedule")
    fake.answer = True
    fake.due = lambda name: fake.answer
    monkeypatch.setitem(sys.modules, "faasci.schedule", fake)
    monkeypatch.setattr("faasci.schedule", fake, raising=False)
    return fake


def test_a_cron_request_runs_the_round_only_when_due(router, schedule, oidc, keys):
    cron = {"X-Connector": "cron-connector", "X-Topic": "cron-function"}
    answer = router(Event("POST", "/", b"", headers=cron))
    assert answer["body"] == {"round": "scheduler:cron-connector"}
    schedule.answer = False
    answer = router(Event("POST", "/", b"", headers=cron))
    assert answer["statusCode"] == 200 and "skipped" in answer["body"]
    # With credentials, any time: an admin or the bundle itself; a runner may not.
    runner = {**cron, **bearer(oidc.token(roles=["runner"]))}
    assert router(Event("POST", "/", b"", headers=runner))["statusCode"] == 403
    admin = {**cron, **bearer(oidc.token(roles=["admin"]))}
    assert router(Event("POST", "/", b"", headers=admin))["body"] == {"round": "user:alice"}
    signed_cron = {**cron, auth.SIGNATURE_HEADER: auth.sign("POST", "/things", b"", KEY, "webhook")}
    answer = router(Event("POST", "/", b"", headers=signed_cron))
    assert answer["body"] == {"round": "function:webhook"}
    # A body makes it an ordinary request: credentials needed.
    assert router(Event("POST", "/", b"{}", headers=cron))["statusCode"] == 401


def test_the_router_keeps_the_readiness_hook(router):
    from faasci import health

    assert router.ready is health.ready


# The gateway client's credentials.


@pytest.fixture
def echo():
    """An HTTP server answering every request with the headers it got."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps(dict(self.headers)).encode()
            self.send_response(202)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_gateway_client_signs_or_sends_its_token_and_keeps_basic_auth_to_system(echo, keys):
    from faasci.invoke import Gateway

    signer = Gateway(echo, system_auth=("admin", "pw"))
    seen = signer.call("runs", {"repo": "x"}, path="abc/cancel").json()
    assert "Authorization" not in seen
    body = json.dumps({"repo": "x"}).encode()
    caller = auth.verify_signature(seen[auth.SIGNATURE_HEADER], "POST", "/runs/abc/cancel",
                                   body, [KEY])  # fmt: skip
    assert caller == auth.identity()
    assert (
        signer.session.get(f"{echo}/system/functions").json()["Authorization"].startswith("Basic ")
    )
    tokens = iter(["t1", "t2"])
    holder = Gateway(echo, token=lambda: next(tokens), system_auth=("admin", "pw"))
    assert holder.call("runs", method="GET").json()["Authorization"] == "Bearer t1"
    seen = holder.session.post(f"{echo}/async-function/lint", data=b"{}").json()
    assert seen["Authorization"] == "Bearer t2" and auth.SIGNATURE_HEADER not in seen
    assert "Authorization" not in requests.get(f"{echo}/function/runs").json()


def test_a_log_link_opens_its_attempt_until_it_expires(monkeypatch):
    """faasci.logs: the link the run record holds opens that attempt's log, no other."""
    from faasci import logs

    link = logs.log_link("20260101-000000-abcdef", "unit", 2)
    attempts = [
        types.SimpleNamespace(number=1, log=None),
        types.SimpleNamespace(number=2, log=link),
    ]
    run = types.SimpleNamespace(stage=lambda name: types.SimpleNamespace(attempts=attempts))
    monkeypatch.setattr(logs, "run_store", lambda: types.SimpleNamespace(get=lambda _: run))
    sig = link.partition("?sig=")[2]
    expiry = int(sig.partition(".")[0])
    assert expiry - time.time() == pytest.approx(logs.LINK_TTL_S, abs=5)

    def opens(attempt, given=sig):
        return logs.link_opens(Event(query={"sig": given}), "20260101-000000-abcdef", "unit",
                               attempt)  # fmt: skip

    assert opens("2") and not opens("1") and not opens("x")
    assert not opens("2", sig[:-1] + ("A" if sig[-1] != "A" else "B"))
    assert not opens("2", f"{expiry + 60}.{sig.partition('.')[2]}")  # a later expiry: no match
    monkeypatch.setattr(logs.time, "time", lambda: expiry + 1)
    assert not opens("2")


def test_a_function_that_cannot_sign_does_not_send_its_hand_off_unsigned(echo, monkeypatch):
    """Vault down in a function: the call fails as a connection would (and is retried by
    its caller) rather than reaching the next function unsigned, to be refused and lost."""
    from faasci import vault
    from faasci.invoke import Gateway, InvocationError

    def down(name, refresh=False):
        raise vault.VaultError("Vault at http://127.0.0.1:9 (VAULT_ADDR) is not reachable")

    monkeypatch.setattr(vault, "platform_secret", down)
    monkeypatch.setattr(auth, "_identity", "")
    assert auth.SIGNATURE_HEADER not in Gateway(echo).call("runs").json()  # the CLI: unsigned
    monkeypatch.setattr(auth, "_identity", "unit")
    with pytest.raises(InvocationError, match="unit cannot sign"):
        Gateway(echo).call_async("integration", {"run_id": "r", "attempt": 1})
