"""The local stack's OpenID Connect provider (npm's oidc-provider, started as `faasci up`
starts it) in a home of its own: discovery, JWT access tokens of every static client
verified against the served JWKS as the functions verify them, a wrong secret refused,
and a restart that keeps earlier tokens valid."""

from __future__ import annotations

import os
import stat
import time

import jwt
import pytest
import requests
from conftest import PORT_OFFSET, ROOT

from faasci.local import oidc, processes
from faasci.local.config import LocalConfig

PORT = 28454 + PORT_OFFSET  # beside the test stack's provider (28444)


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    home = tmp_path_factory.mktemp("oidc-home")
    cfg = LocalConfig(
        stack_file=ROOT / "stack.yml",
        home=home,
        gateway_url="http://127.0.0.1:1",
        nats_port=1,
        s3_port=1,
        secrets_dir=home / "secrets",
        oidc_port=PORT,
    )
    oidc.stop_oidc(cfg)
    assert oidc.start_oidc(cfg, dict(os.environ))
    yield cfg
    oidc.stop_oidc(cfg)


def discovery(cfg: LocalConfig) -> dict:
    r = requests.get(f"{cfg.oidc_issuer}/.well-known/openid-configuration", timeout=5)
    assert r.status_code == 200
    return r.json()


def verify(cfg: LocalConfig, token: str) -> dict:
    """As the functions check a bearer token: keys from the discovered jwks_uri, RS256,
    issuer, audience, expiry."""
    keys = jwt.PyJWKClient(discovery(cfg)["jwks_uri"], cache_keys=False)
    key = keys.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience="faasci",
        issuer=cfg.oidc_issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )


def request_token(cfg: LocalConfig, client: str, secret: str) -> requests.Response:
    """The token endpoint, directly (oidc.token keeps tokens it got)."""
    return requests.post(
        f"{cfg.oidc_issuer}/token",
        data={"grant_type": "client_credentials"},
        auth=(client, secret),
        timeout=5,
    )


def test_discovery(provider):
    doc = discovery(provider)
    assert doc["issuer"] == provider.oidc_issuer == f"http://127.0.0.1:{PORT}"
    assert doc["token_endpoint"] == f"{provider.oidc_issuer}/token"
    assert "client_credentials" in doc["grant_types_supported"]
    keys = requests.get(doc["jwks_uri"], timeout=5).json()["keys"]
    assert [(k["kty"], k["kid"], k.get("use")) for k in keys] == [
        ("RSA", oidc.key_id(provider), "sig")
    ]
    assert all("d" not in k for k in keys)  # the public half only


@pytest.mark.parametrize(
    "client, roles",
    [
        (None, ["admin"]),
        ("test-viewer", ["viewer"]),
        ("test-runner", ["runner"]),
        ("test-admin", ["admin"]),
        ("test-none", []),
    ],
)
def test_tokens_verify_with_roles_and_subject(provider, client, roles):
    token = oidc.token(provider, client)
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"]) == ("RS256", oidc.key_id(provider))
    claims = verify(provider, token)
    assert claims["sub"] == (client or oidc.user_client())
    assert claims["roles"] == roles
    assert claims["aud"] == "faasci"
    assert 3500 <= claims["exp"] - time.time() <= 3600  # about an hour
    assert oidc.token(provider, client) == token  # kept until shortly before it expires


def test_local_user_client_is_the_os_user(provider):
    import getpass

    assert verify(provider, oidc.token(provider))["sub"] == getpass.getuser()


def test_wrong_or_unknown_credentials_are_refused(provider):
    known = oidc.client_secrets(provider)
    r = request_token(provider, "test-admin", known["test-viewer"])
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    r = request_token(provider, "nobody", "secret")
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    # A resource other than faas-ci's is not served.
    r = requests.post(
        f"{provider.oidc_issuer}/token",
        data={"grant_type": "client_credentials", "resource": "urn:elsewhere"},
        auth=("test-admin", known["test-admin"]),
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_target"
    with pytest.raises(KeyError):
        oidc.token(provider, "nobody")


def test_state_is_private(provider):
    folder = oidc.state_dir(provider)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("signing-key.json", "clients.json", "config.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


def test_forged_tokens_signed_by_the_real_key(provider):
    """oidc.sign / private_key: tokens the provider would never issue, with its key."""
    now = int(time.time())
    base = {"iss": provider.oidc_issuer, "sub": "forger", "roles": ["admin"], "iat": now}
    good = oidc.sign(provider, {**base, "aud": "faasci", "exp": now + 60})
    assert verify(provider, good)["sub"] == "forger"
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(provider, oidc.sign(provider, {**base, "aud": "faasci", "exp": now - 120}))
    with pytest.raises(jwt.InvalidAudienceError):
        verify(provider, oidc.sign(provider, {**base, "aud": "other", "exp": now + 60}))
    assert "BEGIN PRIVATE KEY" in oidc.private_key(provider)


def test_restart_keeps_key_and_secrets(provider):
    before = oidc.token(provider, "test-runner")
    assert oidc.stop_oidc(provider)
    assert not processes.pid_of(provider.run, "oidc")
    with pytest.raises(requests.ConnectionError):
        discovery(provider)
    started = time.monotonic()
    assert oidc.start_oidc(provider, dict(os.environ))
    print(f"provider restarted in {time.monotonic() - started:.2f}s")
    assert not oidc.start_oidc(provider, dict(os.environ))  # already running
    assert verify(provider, before)["sub"] == "test-runner"  # the old token still verifies
    r = request_token(provider, "test-runner", oidc.client_secrets(provider)["test-runner"])
    assert r.status_code == 200  # the same secret still works
    assert verify(provider, r.json()["access_token"])["roles"] == ["runner"]
