"""Secrets from a Vault-API server (OpenBao locally, Vault or OpenBao on a cluster), via hvac.

Logging in: `VAULT_AUTH=approle` (the local stack) reads the secrets `vault-role-id` and
`vault-secret-id` (prefix `VAULT_APPROLE_SECRETS`, default `vault`); `VAULT_AUTH=kubernetes`
logs in as `VAULT_ROLE` with the function's service-account token (`VAULT_JWT_FILE`). The
token is renewed while in use (renew_self once two thirds of its TTL have passed, and by
`Vault.held()` in the background while a stage runs); a 403 or a token past its max TTL logs
in again.

Layout in the KV v2 mount `VAULT_MOUNT` (default `secret`):

    faasci/platform/<name>      the platform's own secrets: {current, previous,
                                previous_until (epoch seconds), rotated_at}
    faasci/repos/<namespace>/…  a repository's stage secrets (faasci.cache.namespace_of),
                                named by its pipeline as "<path>#<key>"

`platform_secret(name)` gives the accepted values of a platform secret: the current one
first, then the previous one while inside its overlap window (rotation, see
faasci.secrets). It is cached for CACHE_S; a verifier that sees an unknown signature may
ask again with `refresh=True` (at most once a second), so a rotation is picked up at once.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import hvac
import hvac.exceptions
import requests

from .settings import Settings, settings

log = logging.getLogger("faasci.vault")

CACHE_S = 10.0  # how long platform secrets are kept before reading them again
REFRESH_MIN_S = 1.0  # a forced refresh reads Vault at most this often
TIMEOUT_S = 10.0
PLATFORM = "faasci/platform"
REPOS = "faasci/repos"
PLATFORM_SECRETS = ("internal-signing", "webhook-secret")
SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class VaultError(Exception):
    """Vault cannot be used: unreachable, sealed, refused our login, or misconfigured."""


class Refused(VaultError):
    """Vault's policy does not let this function do that (403 after a fresh login)."""


class SecretNotFound(VaultError):
    """No such secret, or no such key in it. Names the path, never a value."""


def check_path(path: str, what: str = "secret path") -> str:
    """A relative path of plain segments: no '..', no '.', not absolute, not empty."""
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise ValueError(f"{what} {path!r} must be a relative path like 'db' or 'team/db'")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not SEGMENT_RE.match(segment):
            raise ValueError(
                f"{what} {path!r}: each part must be letters, digits, '.', '_' or '-' "
                "(no '..', no empty parts)"
            )
    return path


def repo_path(namespace: str, path: str) -> str:
    """The KV path of a repository's secret `path` (inside the repository's own folder)."""
    check_path(namespace, "repository namespace")
    return f"{REPOS}/{namespace}/{check_path(path)}"


@dataclass
class _Token:
    value: str
    expires_at: float  # monotonic; when to log in again at the latest
    ttl: float  # its lease duration when last issued or renewed
    renew_at: float  # monotonic: renew after this
    renewable: bool


class Vault:
    """A logged-in hvac client, its token renewed while in use."""

    def __init__(self, s: Settings | None = None):
        self.s = s or settings()
        self._lock = threading.RLock()
        self._token: _Token | None = None
        self._issued_ttl = 0.0  # the TTL a login grants
        self._client = hvac.Client(url=self.s.vault_addr, timeout=TIMEOUT_S)
        self.logins = 0  # how many times it logged in (tests look)
        self.renewals = 0

    # Logging in and keeping the token.

    def _credentials(self) -> tuple[str, dict]:
        s = self.s
        if s.vault_auth == "approle":
            role_id = s.secret(f"{s.vault_approle}-role-id")
            secret_id = s.secret(f"{s.vault_approle}-secret-id")
            if not role_id or not secret_id:
                raise VaultError(
                    f"VAULT_AUTH=approle needs the secrets {s.vault_approle}-role-id and "
                    f"{s.vault_approle}-secret-id in {s.secrets_dir}"
                )
            return "approle", {"role_id": role_id, "secret_id": secret_id}
        if s.vault_auth == "kubernetes":
            try:
                jwt = s.vault_jwt_file.read_text().strip()
            except OSError as e:
                raise VaultError(
                    f"VAULT_AUTH=kubernetes: cannot read the service-account token "
                    f"{s.vault_jwt_file} (VAULT_JWT_FILE): {e.strerror}"
                ) from None
            return "kubernetes", {"role": s.vault_role, "jwt": jwt}
        raise VaultError(f"VAULT_AUTH={s.vault_auth!r}: expected approle or kubernetes")

    def login(self) -> None:
        method, creds = self._credentials()
        mount = self.s.vault_auth_mount or method
        try:
            if method == "approle":
                answer = self._client.auth.approle.login(**creds, mount_point=mount)
            else:
                answer = self._client.auth.kubernetes.login(**creds, mount_point=mount)
        except hvac.exceptions.VaultError as e:
            raise VaultError(f"logging in to Vault at {self.s.vault_addr} ({method}): "
                             f"{_first_line(e)}") from None  # fmt: skip
        except requests.RequestException as e:
            raise VaultError(f"Vault at {self.s.vault_addr} (VAULT_ADDR) is not reachable: "
                             f"{type(e).__name__}") from None  # fmt: skip
        self._took(answer["auth"])
        self._issued_ttl = float(answer["auth"].get("lease_duration") or 0)
        self.logins += 1
        log.info("logged in to Vault at %s (%s)", self.s.vault_addr, method)

    def _took(self, auth: dict) -> None:
        now, ttl = time.monotonic(), float(auth.get("lease_duration") or 0)
        self._client.token = auth["client_token"]
        self._token = _Token(
            value=auth["client_token"],
            ttl=ttl,
            expires_at=now + ttl if ttl else float("inf"),
            renew_at=now + ttl * 2 / 3 if ttl else float("inf"),
            renewable=bool(auth.get("renewable")),
        )

    def renew(self) -> None:
        """Renew the token now (a new login when it cannot be renewed any more)."""
        with self._lock:
            token = self._token
            if token is None:
                self.login()
                return
            if token.renewable:
                try:
                    answer = self._client.auth.token.renew_self()
                    granted = float(answer["auth"].get("lease_duration") or 0)
                    # Near its max TTL a renewal grants only what is left: log in again.
                    if granted >= self._issued_ttl / 2:
                        self._took(answer["auth"])
                        self.renewals += 1
                        return
                except (hvac.exceptions.VaultError, requests.RequestException) as e:
                    log.info("renewing the Vault token failed (%s); logging in again", e)
            self.login()

    def client(self) -> hvac.Client:
        """The logged-in client, its token renewed when due."""
        with self._lock:
            token, now = self._token, time.monotonic()
            if token is None or now >= token.expires_at - 1:
                self.login()
            elif now >= token.renew_at:
                self.renew()
            return self._client

    def _call(self, fn):
        """fn(client), logging in again once on a 403 (token revoked or expired)."""
        for tries_left in (1, 0):
            client = self.client()
            try:
                return fn(client)
            except hvac.exceptions.Forbidden as e:
                if not tries_left:
                    raise Refused(f"Vault refused: {_first_line(e)} (its policy)") from None
                with self._lock:
                    if client.token == (self._token and self._token.value):
                        self._token = None  # a new login on the next try
            except requests.RequestException as e:
                raise VaultError(f"Vault at {self.s.vault_addr} (VAULT_ADDR) is not reachable: "
                                 f"{type(e).__name__}") from None  # fmt: skip
            except hvac.exceptions.VaultDown:
                raise VaultError(f"Vault at {self.s.vault_addr} is sealed or down") from None

    @contextlib.contextmanager
    def held(self, every: float | None = None) -> Iterator[Vault]:
        """Keep the token renewed in the background while the block runs (a stage): at
        half its TTL, so it never lapses between two uses."""
        done = threading.Event()

        def keep() -> None:
            while True:
                token = self._token
                wait = every or (max(token.ttl / 2, 1) if token and token.ttl else 60)
                if done.wait(wait):
                    return
                try:
                    self.renew()
                except Exception as e:  # Vault restarting: the next use logs in again
                    log.warning("keeping the Vault token alive failed: %s", e)

        self.client()
        thread = threading.Thread(target=keep, name="vault-renew", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            done.set()
            thread.join(timeout=5)

    # KV v2.

    def read(self, path: str) -> dict[str, str]:
        """The secret's data; SecretNotFound when there is none at `path`."""
        mount = self.s.vault_mount
        try:
            answer = self._call(
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=path, mount_point=mount, raise_on_deleted_version=True
                )
            )
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(f"no secret {mount}/{path} in Vault") from None
        return answer["data"]["data"] or {}

    def write(self, path: str, data: dict[str, str], cas: int | None = None) -> int:
        """Write a new version; its number. `cas`: only over this version (0: only new)."""
        mount = self.s.vault_mount
        answer = self._call(
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=path, secret=data, cas=cas, mount_point=mount
            )
        )
        return int(answer["data"]["version"])

    def version(self, path: str) -> int:
        """The current version of a secret (0 when none)."""
        try:
            meta = self._call(
                lambda c: c.secrets.kv.v2.read_secret_metadata(
                    path=path, mount_point=self.s.vault_mount
                )
            )
        except hvac.exceptions.InvalidPath:
            return 0
        return int(meta["data"]["current_version"])

    def list(self, path: str) -> list[str]:
        """The names under a folder ("name/" for a sub-folder); [] when there is none."""
        try:
            answer = self._call(
                lambda c: c.secrets.kv.v2.list_secrets(path=path, mount_point=self.s.vault_mount)
            )
        except hvac.exceptions.InvalidPath:
            return []
        return sorted(answer["data"]["keys"])

    def token_ttl(self) -> float:
        """What Vault says is left of our token (seconds)."""
        return float(self._call(lambda c: c.auth.token.lookup_self())["data"]["ttl"])

    # Platform secrets.

    def platform_values(self, name: str) -> list[str]:
        data = self.read(f"{PLATFORM}/{name}")
        values = [data["current"]] if data.get("current") else []
        previous, until = data.get("previous"), float(data.get("previous_until") or 0)
        if previous and time.time() < until and previous not in values:
            values.append(previous)
        if not values:
            raise SecretNotFound(f"platform secret {name} has no current value in Vault")
        return values

    def stage_secret(self, namespace: str, path: str, key: str) -> str:
        """One value of a repository's secret (SecretNotFound names the path and key)."""
        full = repo_path(namespace, path)
        try:
            data = self.read(full)
        except SecretNotFound:
            raise SecretNotFound(f"no secret {path!r} for this repository in Vault "
                                 f"({self.s.vault_mount}/{full})") from None  # fmt: skip
        if key not in data:
            raise SecretNotFound(f"secret {path!r} has no key {key!r} "
                                 f"({self.s.vault_mount}/{full})")  # fmt: skip
        return str(data[key])


def _first_line(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if isinstance(errors, list) and errors:
        text = "; ".join(str(x).strip() for x in errors)
    else:
        text = str(e).strip()
    return " ".join(text.split())[:300] or type(e).__name__


# The process's client and cache.

_lock = threading.Lock()
_vault: Vault | None = None
_cache: dict[str, tuple[float, list[str]]] = {}


def vault() -> Vault:
    """The process's client (made from the settings on first use)."""
    global _vault
    with _lock:
        if _vault is None or _vault.s is not settings():
            _vault = Vault(settings())
            _cache.clear()
        return _vault


def platform_secret(name: str, refresh: bool = False) -> list[str]:
    """The accepted values of a platform secret (`internal-signing`, `webhook-secret`):
    current first, then the previous one while its overlap window lasts. Cached CACHE_S;
    `refresh` reads Vault again unless it was read within REFRESH_MIN_S. Raises VaultError
    (SecretNotFound when it was never seeded) when Vault cannot say."""
    client = vault()
    now = time.monotonic()
    cached = _cache.get(name)
    fresh_enough = REFRESH_MIN_S if refresh else CACHE_S
    if cached and now - cached[0] < fresh_enough:
        return list(cached[1])
    values = client.platform_values(name)
    _cache[name] = (time.monotonic(), values)
    return list(values)


def known_platform_values() -> list[str]:
    """Every platform secret value this process has seen (for masking its own logs)."""
    return [v for _, values in list(_cache.values()) for v in values]


def reset_cache(name: str | None = None) -> None:
    """Read a platform secret (every one: None) from Vault on its next use."""
    if name is None:
        _cache.clear()
    else:
        _cache.pop(name, None)


def reset() -> None:
    """Forget the client and the cache (after the settings change; tests)."""
    global _vault
    with _lock:
        _vault = None
        _cache.clear()
