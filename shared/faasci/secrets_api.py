"""The `secrets` function: rotating the platform's own secrets, and writing the secrets a
repository's stages read (faasci.stage_secrets). Values are never returned, listed or
logged: the audit trail and the answers name secrets, never show them.

Rotation (scheduled every other day at 04:00 UTC, and `POST /rotate` by an admin) makes a
new random current value and keeps the old one accepted as `previous` for an overlap window:

- `internal-signing` (function-to-function signatures, faasci.auth): rotated every round.
  The overlap (SIGNING_OVERLAP_HOURS, default 25) outlasts the longest an async hand-off
  signed with the old key may wait in the queue (auth.MAX_AGE_S, 24 h), so a pipeline
  running across a rotation never fails for it; signers take the new key within
  vault.CACHE_S, and a verifier seeing an unknown signature reads Vault again.
- `webhook-secret` (the git hosts' signatures, faasci.webhooks): a person has to paste the
  new value into every git host's webhook settings, so the previous value stays accepted
  for WEBHOOK_SECRET_OVERLAP_DAYS (default 7) and the schedule rotates it only once it is
  WEBHOOK_SECRET_MAX_AGE_DAYS old (default 90; 0: only when asked). `faasci secrets
  show-webhook` prints the current value (and the previous one while it is accepted).

A rotation while the previous value is still inside its window is refused (409) unless
forced: it would drop a value that signed requests, or a git host, may still use.

Admin routes:
    POST /rotate                  {"names": [...], "force": false}; default internal-signing
    PUT  /repos/<namespace>/<path>  {"KEY": "value", ...} merged into the secret at <path>
    GET  /repos/<namespace>         the secret paths and their keys, never values
where <namespace> is cache.namespace_of(repo) (the CLI computes it from the repository).
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from . import audit, vault
from .api import Route, json_body
from .errors import Conflict, NotFound, Unprocessable, UserError
from .masking import MIN_CHARS

log = logging.getLogger("faasci.secrets")

HOUR, DAY = 3600, 24 * 3600


def overlap_s(name: str) -> float:
    if name == "webhook-secret":
        return float(os.environ.get("WEBHOOK_SECRET_OVERLAP_DAYS", "7")) * DAY
    return float(os.environ.get("SIGNING_OVERLAP_HOURS", "25")) * HOUR


def max_age_s(name: str) -> float:
    """How old a secret may get before the schedule rotates it (0: every round)."""
    if name == "webhook-secret":
        days = float(os.environ.get("WEBHOOK_SECRET_MAX_AGE_DAYS", "90"))
        return days * DAY if days > 0 else float("inf")
    return 0


def rotate(name: str, force: bool = False, client: vault.Vault | None = None) -> dict:
    """A new current value of platform secret `name`, the old one kept for its overlap.
    Conflict while an earlier previous value is still accepted (unless `force`)."""
    if name not in vault.PLATFORM_SECRETS:
        raise NotFound(f"no platform secret {name!r}; there are "
                       f"{', '.join(vault.PLATFORM_SECRETS)}", field="names")  # fmt: skip
    client = client or vault.vault()
    path = f"{vault.PLATFORM}/{name}"
    version = client.version(path)
    data = client.read(path) if version else {}
    now = time.time()
    until = float(data.get("previous_until") or 0)
    if data.get("previous") and now < until and not force:
        raise Conflict(
            f"{name} was rotated less than its overlap ago: its previous value is accepted "
            f"until {_iso(until)}; rotating again now would drop it (force to do so anyway)"
        )
    window = overlap_s(name)
    new = {
        "current": secrets.token_urlsafe(32),
        "previous": data.get("current", ""),
        "previous_until": str(int(now + window)) if data.get("current") else "0",
        "rotated_at": str(int(now)),
    }
    try:
        client.write(path, new, cas=version)
    except Exception as e:  # another rotation won the race: that one stands
        if "check-and-set" in str(e):
            raise Conflict(f"{name} was rotated by someone else just now") from None
        raise
    vault.reset_cache(name)
    detail = {"name": name, "overlap_s": int(window), "previous_until": _iso(now + window)}
    audit.record("secrets.rotate", detail=detail)
    log.info("rotated %s; the previous value is accepted until %s", name, detail["previous_until"])
    return detail


def scheduled() -> dict:
    """The scheduled round: every platform secret due by its age."""
    client, now, done, skipped = vault.vault(), time.time(), [], []
    for name in vault.PLATFORM_SECRETS:
        path = f"{vault.PLATFORM}/{name}"
        try:
            rotated_at = float(client.read(path).get("rotated_at") or 0)
        except vault.SecretNotFound:
            rotated_at = 0
        if now - rotated_at < max_age_s(name):
            skipped.append({"name": name, "reason": "not due"})
            continue
        try:
            done.append(rotate(name, client=client))
        except Conflict as e:
            skipped.append({"name": name, "reason": e.message})
    return {"trigger": "cron", "rotated": done, "skipped": skipped}


def write_repo_secret(namespace: str, path: str, values: dict) -> dict:
    """Merge {key: value} into a repository's secret at `path`."""
    full = _repo_path(namespace, path)
    if not values:
        raise UserError('body must name at least one key: {"KEY": "value"}', field="body")
    for key, value in values.items():
        if not isinstance(key, str) or not vault.SEGMENT_RE.match(key):
            raise Unprocessable(f"key {key!r} must be letters, digits, '.', '_' or '-'",
                                field="key")  # fmt: skip
        if not isinstance(value, str):
            raise Unprocessable(f"the value of {key} must be a string", field=key)
        if len(value.strip()) < MIN_CHARS:
            raise Unprocessable(f"the value of {key} is shorter than {MIN_CHARS} characters: "
                                "too short to be masked in logs", field=key)  # fmt: skip
    client = vault.vault()
    try:
        current = client.read(full)
    except vault.SecretNotFound:
        current = {}
    version = client.write(full, {**current, **values})
    detail = {"namespace": namespace, "path": path, "keys": sorted(values), "version": version}
    audit.record("secrets.write", repo=namespace, detail=detail)
    return detail


def list_repo_secrets(namespace: str) -> dict:
    """{path: [keys]} of a repository's secrets (names only)."""
    root = _repo_path(namespace, "x").rsplit("/", 1)[0]
    client, found, folders = vault.vault(), {}, [""]
    while folders:
        folder = folders.pop()
        for name in client.list(f"{root}/{folder}".rstrip("/")):
            if name.endswith("/"):
                folders.append(f"{folder}{name}")
            else:
                found[f"{folder}{name}"] = sorted(client.read(f"{root}/{folder}{name}"))
    return {"namespace": namespace, "secrets": dict(sorted(found.items()))}


def _repo_path(namespace: str, path: str) -> str:
    try:
        return vault.repo_path(namespace, path)
    except ValueError as e:
        raise Unprocessable(str(e), field="path") from None


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# Routes.


def _rotate(event, principal) -> dict:
    body = json_body(event) if (event.body or b"").strip() else {}
    names = body.get("names", ["internal-signing"])
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError("names must be a list of platform secret names", field="names")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise UserError("force must be true or false", field="force")
    return {"rotated": [rotate(name, force=force) for name in names]}


def _put(event, principal, namespace: str, path: str) -> dict:
    return write_repo_secret(namespace, path, json_body(event))


def _list(event, principal, namespace: str) -> dict:
    return list_repo_secrets(namespace)


ROUTES = [
    Route("POST", "/rotate", "admin", _rotate),
    Route("PUT", "/repos/<namespace>/<path:path>", "admin", _put),
    Route("GET", "/repos/<namespace>", "admin", _list),
]
