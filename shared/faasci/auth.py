"""Who is calling: OIDC bearer tokens for people and tools, an HMAC signature for the
bundle's own function-to-function calls, and links a route itself vouches for (a log's).

Roles are hierarchical: viewer < runner < admin. A route names the least role it needs;
`internal` routes take only a function's signature (faasci.api.Router checks).

Internal signature (header X-Faasci-Signature): `t=<unix>,fn=<caller>,v1=<hex>`, the hex an
HMAC-SHA256 with the platform's `internal-signing` secret over
`<t>.<caller>.<METHOD>./<function><path>.<sha256 of the body>`. The target function is in it,
so a call to one function cannot be replayed against another; it is accepted for MAX_AGE_S
(queued async calls wait), with any key vault still accepts (rotation overlap).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests

from .errors import UserError

if TYPE_CHECKING:  # imported where a token is checked: it costs a function's start ~25 ms
    import jwt

log = logging.getLogger("faasci.auth")

ROLES = ("viewer", "runner", "admin")  # least to most
ROUTE_ROLES = (*ROLES, "internal", "webhook")
KINDS = ("user", "function", "webhook", "scheduler", "link")
SIGNATURE_HEADER = "X-Faasci-Signature"
SIGNING_SECRET = "internal-signing"
MAX_AGE_S = 24 * 3600  # an async call may sit in the queue this long
KID_REFETCH_S = 10  # an unknown kid fetches the issuer's keys again at most this often
# Asymmetric only: an HS* token would be checked with a public key as its secret.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
              "EdDSA")  # fmt: skip


class Unauthorized(UserError):
    """No credentials, or ones that do not check out."""

    status = 401

    def __init__(self, message: str, field: str | None = "Authorization", error: str | None = None):
        super().__init__(message, field)
        # RFC 6750: no error code when nothing was presented, invalid_token otherwise.
        challenge = 'Bearer realm="faasci"'
        if error:
            challenge += f', error="{error}", error_description="{_quoted(message)}"'
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(UserError):
    """A known caller without the role the route needs."""

    status = 403

    def __init__(self, message: str, role: str):
        super().__init__(message, "role")
        self.role = role
        self.headers = {
            "WWW-Authenticate": f'Bearer realm="faasci", error="insufficient_scope", '
            f'error_description="{_quoted(message)}"'
        }

    def body(self) -> dict:
        return {**super().body(), "required_role": self.role}


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


@dataclass(frozen=True)
class Principal:
    """`subject` is the token's sub, the calling function's name, or for a webhook the
    host-qualified sender ("github:octocat")."""

    subject: str
    kind: str
    roles: frozenset[str] = frozenset()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"principal kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def actor(self) -> str:
        return self.subject if self.kind == "webhook" else f"{self.kind}:{self.subject}"

    def allows(self, role: str) -> bool:
        """May this caller use a route needing `role`? The bundle's functions may call any
        route (they hold the signing secret, as the platform itself does)."""
        if self.kind == "function":
            return role != "webhook"
        if role not in ROLES or self.kind != "user":
            return False
        return any(ROLES.index(r) >= ROLES.index(role) for r in self.roles if r in ROLES)


current: ContextVar[Principal | None] = ContextVar("faasci_principal", default=None)


def actor() -> str:
    """Who the work in progress is for ("system" outside a request)."""
    principal = current.get()
    return principal.actor if principal else "system"


@contextlib.contextmanager
def acting(principal: Principal | None) -> Iterator[None]:
    token = current.set(principal)
    try:
        yield
    finally:
        current.reset(token)


# This process's function name: what its signed calls say they come from.
_identity = os.environ.get("FAASCI_FUNCTION") or ""


def set_identity(name: str) -> None:
    global _identity
    _identity = _identity or name


def identity() -> str:
    return _identity or "faasci"


# Internal signatures.


class Unavailable(UserError):
    """What checking a caller needs (Vault, the OIDC issuer) does not answer: try again."""

    status = 503


def signing_keys() -> list[str]:
    """The internal-signing values, current first. A function must have them (Unavailable
    while Vault cannot say: an unsigned hand-off would be refused and lost); any other
    process (the CLI, tests) gets [] and its calls go unsigned."""
    try:
        from . import vault

        return [k for k in vault.platform_secret(SIGNING_SECRET) if k]
    except Exception as e:
        if _identity:
            raise Unavailable(f"{_identity} cannot sign its call: {e}", "vault") from None
        log.debug("no internal signing key: %s", e)
        return []


def accepted_keys(refresh: bool = False) -> list[str]:
    """The values a signature may be made with; Unavailable when Vault cannot say
    (a caller's good signature must not become a 401 because Vault is down)."""
    from . import vault

    try:
        return [k for k in vault.platform_secret(SIGNING_SECRET, refresh=refresh) if k]
    except vault.VaultError as e:
        raise Unavailable(f"cannot check the signature now: {e}", "vault") from None


def canonical_path(function: str, path: str) -> str:
    """`/<function>/<path>` as both ends see it: no namespace suffix, no slashes at the ends."""
    return f"/{function.partition('.')[0]}/{path.strip('/')}".rstrip("/") or "/"


def _digest(key: str, message: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def _message(t: int, caller: str, method: str, path: str, body: bytes) -> str:
    return f"{t}.{caller}.{method.upper()}.{path}.{hashlib.sha256(body or b'').hexdigest()}"


def sign(method: str, path: str, body: bytes, key: str, caller: str, now: float | None = None
         ) -> str:  # fmt: skip
    """The signature header's value for a call of `path` (canonical_path's form)."""
    t = int(time.time() if now is None else now)
    if not caller or any(c in caller for c in ",=. "):
        raise ValueError(f"caller {caller!r} is not a function name")
    return f"t={t},fn={caller},v1={_digest(key, _message(t, caller, method, path, body))}"


def sign_headers(method: str, path: str, body: bytes, keys: list[str] | None = None) -> dict:
    """Headers signing this call as this process's function; {} without a signing key."""
    keys = signing_keys() if keys is None else keys
    if not keys:
        return {}
    return {SIGNATURE_HEADER: sign(method, path, body, keys[0], identity())}


def verify_signature(header: str, method: str, path: str, body: bytes, keys: list[str],
                     now: float | None = None, leeway_s: float = 30) -> str:  # fmt: skip
    """The calling function's name, when `header` signs this call with one of `keys`."""
    fields = dict(part.partition("=")[::2] for part in header.split(",") if "=" in part)
    t, caller, given = fields.get("t", ""), fields.get("fn", ""), fields.get("v1", "")
    if not (t.isdigit() and caller and given):
        raise Unauthorized(f"{SIGNATURE_HEADER} must be t=<unix time>,fn=<function>,v1=<hex>",
                           SIGNATURE_HEADER, "invalid_request")  # fmt: skip
    age = (time.time() if now is None else now) - int(t)
    if age > MAX_AGE_S or age < -leeway_s:
        raise Unauthorized(f"{SIGNATURE_HEADER} is expired or from the future",
                           SIGNATURE_HEADER, "invalid_token")  # fmt: skip
    message = _message(int(t), caller, method, path, body)
    if not keys or not any(hmac.compare_digest(_digest(k, message), given) for k in keys):
        raise Unauthorized(f"{SIGNATURE_HEADER} does not match the request",
                           SIGNATURE_HEADER, "invalid_token")  # fmt: skip
    return caller


# OIDC bearer tokens.


@dataclass(frozen=True)
class OIDCConfig:
    issuer: str
    audience: str = "faasci"
    roles_claim: str = "roles"
    leeway_s: float = 30
    jwks_url: str | None = None  # where the keys are, when not where discovery says

    @classmethod
    def from_env(cls, env=None) -> OIDCConfig | None:
        env = os.environ if env is None else env
        if not env.get("OIDC_ISSUER"):
            return None
        return cls(
            issuer=env["OIDC_ISSUER"].rstrip("/"),
            audience=env.get("OIDC_AUDIENCE") or "faasci",
            roles_claim=env.get("OIDC_ROLES_CLAIM") or "roles",
            leeway_s=float(env.get("OIDC_LEEWAY_S") or 30),
            jwks_url=env.get("OIDC_JWKS_URL") or None,
        )


_jwks: dict[str, jwt.PyJWKClient] = {}
_jwks_lock = threading.Lock()


def jwks_client(issuer: str, jwks_url: str | None = None) -> jwt.PyJWKClient:
    """The issuer's key set client, from its discovery document (or at `jwks_url`: a
    container reaches the local provider by another address); one per issuer. It keeps
    the keys and fetches them again when a token names a kid it does not hold."""
    with _jwks_lock:
        client = _jwks.get(issuer)
    if client is not None:
        return client
    if jwks_url:
        return _keep(issuer, jwks_url)
    url = f"{issuer}/.well-known/openid-configuration"
    try:
        resp = requests.get(url, timeout=5)
        resp.raise_for_status()
        discovery = resp.json()
    except (requests.RequestException, ValueError) as e:
        log.warning("OIDC discovery at %s failed: %s", url, e)
        raise Unavailable(f"the OIDC issuer {issuer} is not reachable; try again",
                          "OIDC_ISSUER") from None  # fmt: skip
    if discovery.get("issuer", "").rstrip("/") != issuer or not discovery.get("jwks_uri"):
        raise Unauthorized(f"{url} does not describe issuer {issuer}")
    return _keep(issuer, discovery["jwks_uri"])


def _keep(issuer: str, jwks_url: str) -> jwt.PyJWKClient:
    import jwt

    client = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=5,
                             cooldown_duration=KID_REFETCH_S)  # fmt: skip
    with _jwks_lock:
        return _jwks.setdefault(issuer, client)


def bearer_token(header: str) -> str:
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized("expected Authorization: Bearer <token>", error="invalid_request")
    return token


def verify_token(token: str, config: OIDCConfig | None) -> Principal:
    """The user a JWT access token names, once its signature (by the issuer's key), issuer,
    audience, expiry and not-before check out. A token that checked out is believed for
    VERIFIED_S more (never past its exp) without checking it again: a client sends one token
    with many requests, and checking one costs ~6 ms of CPU (PyJWT decodes it four times)."""
    if config is None:
        raise Unauthorized("bearer tokens are not accepted: no OIDC issuer is configured "
                           "(OIDC_ISSUER)", error="invalid_token")  # fmt: skip
    key, now = (config, hashlib.sha256(token.encode()).digest()), time.time()
    with _verified_lock:
        believed = _verified.get(key)
    if believed and now < believed[1]:
        return believed[0]
    principal, exp = _check_token(token, config)
    with _verified_lock:
        if len(_verified) >= VERIFIED_MAX:  # many clients: start the memory afresh
            _verified.clear()
        _verified[key] = (principal, min(exp, now + VERIFIED_S))
    return principal


VERIFIED_S = 60
VERIFIED_MAX = 4096
_verified: dict[tuple[OIDCConfig, bytes], tuple[Principal, float]] = {}
_verified_lock = threading.Lock()


def _check_token(token: str, config: OIDCConfig) -> tuple[Principal, float]:
    """verify_token's checks: (the principal, the token's exp)."""
    import jwt

    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise Unauthorized("the bearer token is not a JWT", error="invalid_token") from None
    if header.get("alg") not in ALGORITHMS:
        raise Unauthorized(f"token algorithm {header.get('alg')!r} is not accepted",
                           error="invalid_token")  # fmt: skip
    if str(claims.get("iss", "")).rstrip("/") != config.issuer:  # never fetch a stranger's keys
        raise Unauthorized(f"the token's issuer {claims.get('iss')!r} is not {config.issuer}",
                           error="invalid_token")  # fmt: skip
    try:
        key = jwks_client(config.issuer, config.jwks_url).get_signing_key_from_jwt(token)
    except jwt.PyJWKClientConnectionError:
        raise Unavailable(f"the keys of {config.issuer} are not reachable; try again",
                          "OIDC_ISSUER") from None  # fmt: skip
    except jwt.PyJWTError:
        raise Unauthorized("the token's key is not one of the issuer's",
                           error="invalid_token") from None  # fmt: skip
    try:
        claims = jwt.decode(
            token, key, algorithms=[header["alg"]], audience=config.audience,
            issuer=claims["iss"], leeway=config.leeway_s,
            options={"require": ["exp", "iss", "aud"]},
        )  # fmt: skip
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired", error="invalid_token") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("the token is not valid yet", error="invalid_token") from None
    except jwt.InvalidAudienceError:
        raise Unauthorized(f"the token is not for audience {config.audience!r}",
                           error="invalid_token") from None  # fmt: skip
    except jwt.MissingRequiredClaimError as e:
        raise Unauthorized(f"the token has no {e.claim!r} claim", error="invalid_token") from None
    except jwt.PyJWTError as e:
        raise Unauthorized(f"the token does not check out: {e}", error="invalid_token") from None
    subject = claims.get("sub") or claims.get("client_id") or claims.get("azp")
    if not isinstance(subject, str) or not subject:
        raise Unauthorized("the token names no subject", error="invalid_token")
    return Principal(subject, "user", roles_of(claims, config.roles_claim)), float(claims["exp"])


def roles_of(claims: dict, claim: str) -> frozenset[str]:
    """The known roles in `claim` (a dotted path, e.g. realm_access.roles): a list or a
    space-separated string."""
    value = claims
    for part in claim.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list):
        return frozenset()
    return frozenset(r for r in value if isinstance(r, str) and r in ROLES)


def expires_at(token: str) -> float | None:
    """A JWT's exp, unverified (for a client deciding when to fetch a new one)."""
    import jwt

    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) else None


def _with_fresh_keys(check):
    """check(keys), once more with keys read again from Vault when they do not match (a
    rotation this process has not seen yet)."""
    try:
        return check(accepted_keys())
    except Unauthorized:
        return check(accepted_keys(refresh=True))


def authenticate(event, function: str, link=None, config: OIDCConfig | None = None
                 ) -> Principal:  # fmt: skip
    """The caller of `event` (a request to `function`): a bearer token, else a function's
    signature, else a link (?sig=) when `link()` vouches for it; Unauthorized when none
    checks out."""
    headers = event.headers
    if headers.get("Authorization"):
        return verify_token(bearer_token(headers["Authorization"]),
                            config or OIDCConfig.from_env())  # fmt: skip
    path = canonical_path(function, event.path)  # as the server decoded it
    if headers.get(SIGNATURE_HEADER):
        check = functools.partial(verify_signature, headers[SIGNATURE_HEADER], event.method,
                                  path, event.body or b"")  # fmt: skip
        return Principal(_with_fresh_keys(check), "function")
    query = event.query
    if link and query.get("sig"):
        if not link():
            raise Unauthorized("the link is not valid (expired, or not this one's)", "sig",
                               "invalid_token")  # fmt: skip
        return Principal(path, "link")
    raise Unauthorized("credentials needed: Authorization: Bearer <OIDC access token>")
