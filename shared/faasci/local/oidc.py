"""The local stack's OpenID Connect provider: npm's `oidc-provider` (an OpenID-certified
implementation) run by Node from ./oidc-provider/server.mjs, so `faasci up` needs no set-up
and the command line gets a token for the local user by itself.

Static clients use the client_credentials grant and get RS256 JWT access tokens for the
audience `faasci` with a `roles` claim; the token's `sub` is the client id. The local user's
client is named after the OS user (roles [admin]); test-viewer, test-runner, test-admin and
test-none (no roles) exist for tests. Client secrets and the signing key are made once and
kept (0600) in <home>/oidc/, so a restart keeps earlier tokens valid.

oidc-provider 8.8.1 (the 9.x line supports Node.js 22+ only) is installed by scripts/install
with `npm ci` into the venv (.venv/oidc-provider), never into shared/, which every function's
build context copies."""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import requests

from . import processes
from .config import LocalConfig

AUDIENCE = "faasci"
RESOURCE = "urn:faasci"  # the resource indicator (RFC 8707 wants an absolute URI)
TOKEN_TTL_S = 3600
SOURCE = Path(__file__).resolve().parent / "oidc-provider"  # server.mjs, package(-lock).json
# Every client but the local user's, with its roles (hierarchical: viewer < runner < admin).
TEST_CLIENTS = {
    "test-viewer": ["viewer"],
    "test-runner": ["runner"],
    "test-admin": ["admin"],
    "test-none": [],
}
USER_ROLES = ["admin"]


def modules_dir() -> Path:
    """Where scripts/install put oidc-provider's node_modules (beside this Python's venv)."""
    return Path(os.environ.get("FAASCI_OIDC_MODULES") or Path(sys.prefix) / "oidc-provider")


def user_client() -> str:
    """The local user's client id, which is also its tokens' `sub`: the OS user name."""
    return getpass.getuser()


def state_dir(cfg: LocalConfig) -> Path:
    return cfg.home / "oidc"


# --- the provider's state: signing key and clients, made once --------------------------------


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, 0600 from the start (never briefly wider)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638: the key's id, stable for the key."""
    members = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"))
    digest = hashlib.sha256(members.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def ensure_signing_key(cfg: LocalConfig) -> dict:
    """The provider's RSA signing key as a private JWK (made on first use, then kept)."""
    path = state_dir(cfg) / "signing-key.json"
    if path.exists():
        return json.loads(path.read_text())
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key, as_dict=True)
    jwk.pop("key_ops", None)  # ["sign"] alone would keep oidc-provider from verifying with it
    jwk.update(kid=jwk_thumbprint(jwk), use="sig", alg="RS256")
    state_dir(cfg).mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, json.dumps(jwk))
    return jwk


def client_secrets(cfg: LocalConfig, create: bool = True) -> dict[str, str]:
    """Every client's secret (made on first use, then kept; a new client gets one too)."""
    path = state_dir(cfg) / "clients.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if not create:
        return known
    wanted = [user_client(), *TEST_CLIENTS]
    if missing := [c for c in wanted if c not in known]:
        known.update({c: secrets.token_urlsafe(32) for c in missing})
        state_dir(cfg).mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, json.dumps(known, indent=1))
    return known


def write_config(cfg: LocalConfig) -> None:
    """The state folder server.mjs reads: config.json (issuer, port, clients with secrets
    and roles) and signing-key.json."""
    ensure_signing_key(cfg)
    known = client_secrets(cfg)
    roles = {user_client(): USER_ROLES, **TEST_CLIENTS}
    config = {
        "issuer": cfg.oidc_issuer,
        "port": cfg.oidc_port,
        "audience": AUDIENCE,
        "resource": RESOURCE,
        "access_token_ttl": TOKEN_TTL_S,
        "clients": [
            {"client_id": c, "client_secret": known[c], "roles": r} for c, r in roles.items()
        ],
    }
    write_private(state_dir(cfg) / "config.json", json.dumps(config, indent=1))


def private_key(cfg: LocalConfig) -> str:
    """The provider's signing key as PEM (PKCS#8), for tests that make expired or
    wrong-audience tokens signed by the real key (give them `key_id(cfg)` as `kid`)."""
    from cryptography.hazmat.primitives import serialization
    from jwt.algorithms import RSAAlgorithm

    key = RSAAlgorithm.from_jwk(ensure_signing_key(cfg))
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def key_id(cfg: LocalConfig) -> str:
    """The `kid` of the provider's signing key, as its JWKS and tokens name it."""
    return ensure_signing_key(cfg)["kid"]


def sign(cfg: LocalConfig, claims: dict, headers: dict | None = None) -> str:
    """A JWT signed with the provider's real key (RS256, its kid): for tests that need a
    token the provider would never issue (expired, another audience or issuer, odd roles)."""
    import jwt

    return jwt.encode(
        claims, private_key(cfg), algorithm="RS256", headers={"kid": key_id(cfg), **(headers or {})}
    )


# --- tokens --------------------------------------------------------------------------------

_tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
_tokens_lock = threading.Lock()


def token(cfg: LocalConfig, client: str | None = None) -> str:
    """An access token (a JWT for the audience `faasci`) for `client`, by default the local
    user's, from the provider's token endpoint with the client_credentials grant. Kept in
    this process and reused until a minute before it expires."""
    client = client or user_client()
    secret = client_secrets(cfg, create=False).get(client)
    if secret is None:
        raise KeyError(f"no OIDC client {client!r} in {state_dir(cfg)} (has faasci up run?)")
    cache_key = (cfg.oidc_issuer, client, secret)
    with _tokens_lock:
        value, expires = _tokens.get(cache_key, ("", 0.0))
    if time.time() < expires - 60:
        return value
    try:
        r = requests.post(
            f"{cfg.oidc_issuer}/token",
            data={"grant_type": "client_credentials"},
            # RFC 6749 2.3.1: id and secret are form-encoded before Basic authentication.
            auth=(quote(client, safe=""), quote(secret, safe="")),
            timeout=10,
        )
    except requests.ConnectionError:
        raise RuntimeError(
            f"the local OIDC provider ({cfg.oidc_issuer}) is not running: faasci up starts it"
        ) from None
    if r.status_code != 200:
        raise RuntimeError(f"OIDC token for {client!r}: {r.status_code} {r.text[:300]}")
    body = r.json()
    with _tokens_lock:
        _tokens[cache_key] = (body["access_token"], time.time() + int(body["expires_in"]))
    return body["access_token"]


# --- the process -----------------------------------------------------------------------------


def node() -> str:
    found = shutil.which("node")
    if not found:
        raise SystemExit("node is not installed: the local OIDC provider needs Node.js 20+")
    return found


def argv(cfg: LocalConfig) -> list[str]:
    modules = modules_dir() / "node_modules"
    if not (modules / "oidc-provider").is_dir():
        raise SystemExit(f"oidc-provider is not installed in {modules}; run ./scripts/install")
    return [node(), str(SOURCE / "server.mjs"), str(modules), str(state_dir(cfg))]


def ready(cfg: LocalConfig) -> bool:
    """It serves discovery for our issuer and a JWKS with our key (not some other server)."""
    r = requests.get(f"{cfg.oidc_issuer}/.well-known/openid-configuration", timeout=2)
    if r.status_code != 200 or r.json().get("issuer") != cfg.oidc_issuer:
        return False
    keys = requests.get(r.json()["jwks_uri"], timeout=2).json()["keys"]
    return any(k.get("kid") == key_id(cfg) for k in keys)


def start_oidc(cfg: LocalConfig, env: dict[str, str], timeout: float = 30) -> bool:
    """Start the provider unless running; wait until it serves its discovery document.
    False when it was already running."""
    if processes.pid_of(cfg.run, "oidc"):
        return False
    write_config(cfg)
    pid = processes.start(cfg.run, "oidc", argv(cfg), cfg.logs / "oidc.log", env)

    def up() -> bool:
        if not processes.alive(pid):
            raise SystemExit(f"the OIDC provider exited; see {cfg.logs / 'oidc.log'}")
        return ready(cfg)

    try:
        processes.wait_until(up, timeout, "the OIDC provider", interval=0.05)
    except BaseException:
        processes.stop(cfg.run, "oidc")
        raise
    return True


def stop_oidc(cfg: LocalConfig) -> bool:
    return processes.stop(cfg.run, "oidc", timeout=5)
