"""Git host webhooks: a signed push of a configured repository and branch starts a run.

Hosts, told apart by their event header (Gitea and Forgejo also send GitHub's headers,
so theirs are looked at first):

  Gitea/Forgejo  X-Gitea-Event (X-Forgejo-Event), X-Gitea-Signature (X-Forgejo-Signature):
                 the hex HMAC-SHA256 of the raw body; delivery id X-Gitea-Delivery
  GitLab         X-Gitlab-Event, X-Gitlab-Token: the secret itself; delivery id
                 Idempotency-Key (the same on a retry), else X-Gitlab-Event-UUID
  GitHub         X-GitHub-Event, X-Hub-Signature-256: `sha256=` and the hex HMAC-SHA256 of
                 the raw body; delivery id X-GitHub-Delivery

Order of checks, each answered as JSON:
  1. the signature, in constant time, against every accepted value of the platform's
     `webhook-secret` (faasci.vault: the current one and, during a rotation's overlap, the
     previous): missing or bad is 401 and nothing else happens (the body is not even
     parsed before it checks out);
  2. the event: GitHub's `ping` and every event that is not a push (GitLab's and Gitea's
     test deliveries of other events too) answer 200 and start nothing;
  3. the repository and ref against WEBHOOK_REPOS; a push that is not configured answers
     200 {"ignored"}; a deleted branch or tag too;
  4. the delivery: its id, and the body's digest, are claimed once (NATS KV, kept for
     REPLAY_TTL_S): a replay answers 200 {"duplicate"} and starts nothing;
  5. the run (202), of the configured repository URL (never the payload's), at the pushed
     commit, recorded in the audit trail as the sender ("github:octocat").

WEBHOOK_REPOS: space-separated `<repository>[#<glob>[,<glob>...]]`. The repository is
compared with the payload's URLs (clone, SSH, web) after faasci.cache.normalize_repo, so
`https://github.com/o/r.git`, `https://github.com/o/r` and `git@github.com:o/r.git` are one.
The repository may be a pattern (`https://github.com/acme/*`, an organisation's webhook),
matched against the payload's normalized URLs (`*` crosses `/`); the run is then of the
payload's URL it matched, which the host's signature vouches for.
A glob matches a branch name (`main`, `release/*`; `*` crosses `/`) or, when it starts with
`refs/`, the whole ref (`refs/tags/v*` for tags). Without globs every branch and tag of the
repository starts runs; with globs only the refs they match, so tags only through a
`refs/tags/...` glob. Unset or empty: nothing is configured, and every push is ignored.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re

from . import once
from .api import json_body
from .cache import normalize_repo
from .errors import UserError
from .trigger import start_run

log = logging.getLogger("faasci.webhooks")

ZERO_SHA = "0" * 40
SECRET = "webhook-secret"
REPLAY_BUCKET = "faasci-webhook-deliveries"
REPLAY_TTL_S = 7 * 24 * 3600  # longer than any host retries or offers a redelivery for
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class Unsigned(UserError):
    """No signature, or one that does not check out: 401."""

    status = 401


class Unavailable(UserError):
    """The secret to check with cannot be read now (Vault away, none configured): 503."""

    status = 503


# Hosts: how each one names its event, signs its body and numbers its deliveries.


def host_of(headers) -> str | None:
    if headers.get("X-Gitea-Event") or headers.get("X-Forgejo-Event"):
        return "gitea"
    if headers.get("X-Gitlab-Event"):
        return "gitlab"
    if headers.get("X-GitHub-Event"):
        return "github"
    return None


def event_of(host: str, headers) -> str:
    name = {"gitea": headers.get("X-Gitea-Event") or headers.get("X-Forgejo-Event"),
            "gitlab": headers.get("X-Gitlab-Event"),
            "github": headers.get("X-GitHub-Event")}[host]  # fmt: skip
    return (name or "").strip()


def delivery_of(host: str, headers) -> str | None:
    if host == "gitea":
        return headers.get("X-Gitea-Delivery") or headers.get("X-Forgejo-Delivery")
    if host == "gitlab":
        return headers.get("Idempotency-Key") or headers.get("X-Gitlab-Event-UUID")
    return headers.get("X-GitHub-Delivery")


def _hmac_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed(host: str, headers, body: bytes, secrets: list[str]) -> bool:
    """Does the request carry a valid signature made with one of `secrets`? Every secret
    is compared (in constant time), whichever matches."""
    if host == "github":
        given = (headers.get("X-Hub-Signature-256") or "").strip()
        expected = [f"sha256={_hmac_hex(s, body)}" for s in secrets]
    elif host == "gitea":
        given = (headers.get("X-Gitea-Signature") or headers.get("X-Forgejo-Signature")
                 or "").strip().lower()  # fmt: skip
        expected = [_hmac_hex(s, body) for s in secrets]
    else:
        given = headers.get("X-Gitlab-Token") or ""
        expected = secrets
    matches = [hmac.compare_digest(e.encode(), given.encode()) for e in expected]
    return bool(given) and any(matches)


SIGNATURE_HEADER = {
    "github": "X-Hub-Signature-256",
    "gitea": "X-Gitea-Signature",
    "gitlab": "X-Gitlab-Token",
}


def webhook_secrets(refresh: bool = False) -> list[str]:
    """The accepted values of `webhook-secret`, current first."""
    from . import vault

    try:
        values = vault.platform_secret(SECRET, refresh=refresh)
    except vault.VaultError as e:
        raise Unavailable(f"cannot check the webhook's signature now: {e}", "vault") from None
    values = [v for v in values if v]
    if not values:
        raise Unavailable(f"no {SECRET} is configured: no webhook can be verified", SECRET)
    return values


def verify(event) -> str:
    """The host of a request whose signature checks out; Unsigned (401) otherwise."""
    headers, body = event.headers, event.body or b""
    host = host_of(headers)
    if host is None:
        raise Unsigned("not a signed webhook: expected X-GitHub-Event with "
                       "X-Hub-Signature-256, X-Gitlab-Event with X-Gitlab-Token, or "
                       "X-Gitea-Event with X-Gitea-Signature", field="X-GitHub-Event")  # fmt: skip
    header = SIGNATURE_HEADER[host]
    if not (headers.get(header) or (host == "gitea" and headers.get("X-Forgejo-Signature"))):
        raise Unsigned(f"the {host} webhook has no {header}", field=header)
    # A secret rotated since this process last read it: ask Vault again before refusing.
    if not (signed(host, headers, body, webhook_secrets())
            or signed(host, headers, body, webhook_secrets(refresh=True))):  # fmt: skip
        log.warning("%s webhook with a bad %s refused", host, header)
        raise Unsigned(f"{header} does not match the body and the webhook secret",
                       field=header)  # fmt: skip
    return host


# Configuration: which repositories and refs start runs.


def configured(env=None) -> list[tuple[str, list[str]]]:
    """WEBHOOK_REPOS as (repository, globs)."""
    env = os.environ if env is None else env
    entries = []
    for entry in env.get("WEBHOOK_REPOS", "").split():
        repo, _, globs = entry.partition("#")
        entries.append((repo, [g for g in globs.split(",") if g]))
    return entries


def ref_allowed(ref: str, globs: list[str]) -> bool:
    if not globs:
        return ref.startswith(("refs/heads/", "refs/tags/"))
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    return any(
        fnmatch.fnmatchcase(ref, g) if g.startswith("refs/")
        else branch is not None and fnmatch.fnmatchcase(branch, g)
        for g in globs
    )  # fmt: skip


def match(urls: list[str], ref: str, env=None) -> tuple[str | None, str]:
    """(the repository to run, or None; why not, when None). An entry naming one repository
    runs its own spelling; a pattern runs the payload's URL that it matched."""
    entries = configured(env)
    if not entries:
        return None, "no repository is configured for webhooks (WEBHOOK_REPOS)"
    names = {normalize_repo(u) for u in urls}
    repos = []
    for repo, globs in entries:
        if _is_pattern(repo):
            wanted = normalize_repo(repo)
            found = next((u for u in urls if fnmatch.fnmatchcase(normalize_repo(u), wanted)),
                         None)  # fmt: skip
        else:
            found = repo if normalize_repo(repo) in names else None
        if found:
            repos.append((found, globs))
    if not repos:
        return None, f"{urls[0]} is not configured for webhooks (WEBHOOK_REPOS)"
    for repo, globs in repos:
        if ref_allowed(ref, globs):
            return repo, ""
    return None, f"{ref} of {urls[0]} is not configured for webhooks (WEBHOOK_REPOS)"


def _is_pattern(repo: str) -> bool:
    return any(c in repo for c in "*?[")


# The push itself.


def _strings(*values) -> list[str]:
    return [v for v in values if isinstance(v, str) and v]


def push_of(host: str, body: dict) -> dict:
    """The push's repository URLs, ref, commit and sender, from the host's payload."""
    if host == "gitlab":
        project = body.get("project") if isinstance(body.get("project"), dict) else {}
        repository = body.get("repository") if isinstance(body.get("repository"), dict) else {}
        urls = _strings(project.get("git_http_url"), project.get("git_ssh_url"),
                        project.get("web_url"), repository.get("git_http_url"),
                        repository.get("git_ssh_url"), repository.get("homepage"))  # fmt: skip
        commit = body.get("checkout_sha") or body.get("after")
        sender = body.get("user_username") or body.get("user_name")
    else:
        repository = body.get("repository")
        if not isinstance(repository, dict):
            raise UserError("push event has no repository object", field="repository")
        urls = _strings(repository.get("clone_url"), repository.get("ssh_url"),
                        repository.get("html_url"), repository.get("git_url"),
                        repository.get("url"))  # fmt: skip
        commit = body.get("after")
        who = body.get("sender") if isinstance(body.get("sender"), dict) else {}
        pusher = body.get("pusher") if isinstance(body.get("pusher"), dict) else {}
        sender = who.get("login") or who.get("username") or pusher.get("login") \
            or pusher.get("name")  # fmt: skip
    if not urls:
        raise UserError("push event names no repository URL", field="repository")
    ref = body.get("ref")
    if not isinstance(ref, str) or not ref.startswith(("refs/heads/", "refs/tags/")):
        raise UserError("push event ref must be refs/heads/<branch> or refs/tags/<tag>",
                        field="ref")  # fmt: skip
    deleted = body.get("deleted") is True or body.get("after") == ZERO_SHA
    if not deleted and not (isinstance(commit, str) and SHA_RE.match(commit)):
        raise UserError("push event after must be a 40-character commit sha", field="after")
    return {"urls": urls, "ref": ref, "commit": None if deleted else commit,
            "sender": sender if isinstance(sender, str) and sender else "unknown"}  # fmt: skip


def is_push(host: str, name: str) -> bool:
    if host == "gitlab":
        return name in ("Push Hook", "Tag Push Hook")
    return name == "push"


def _replay_keys(host: str, delivery: str, body: bytes) -> list[str]:
    """KV keys of the delivery id and of the body (a captured body sent again under a new
    delivery id, which the signature does not cover, is a replay too)."""
    return [f"delivery.{host}.{hashlib.sha256(delivery.encode()).hexdigest()[:40]}",
            f"body.{hashlib.sha256(body).hexdigest()[:40]}"]  # fmt: skip


def handle(event) -> dict:
    """A git host's webhook request (the webhook function's POST /)."""
    host = verify(event)
    headers, raw = event.headers, event.body or b""
    name = event_of(host, headers)
    if host == "github" and name == "ping":
        return {"pong": True, "host": host}
    if not is_push(host, name):
        return {"ignored": f"{host} event {name or '(none)'!r} starts nothing; only pushes do"}
    push = push_of(host, json_body(event))
    if push["commit"] is None:
        return {"ignored": f"{push['ref']} was deleted"}
    repo, why = match(push["urls"], push["ref"])
    if repo is None:
        log.info("%s push ignored: %s", host, why)
        return {"ignored": why}
    delivery = delivery_of(host, headers)
    if not delivery:
        raise UserError(f"the {host} push has no delivery id header", field="delivery")
    keys = _replay_keys(host, delivery, raw)
    claimed = []
    for key in keys:
        if not once.claim(REPLAY_BUCKET, key, REPLAY_TTL_S):
            for mine in claimed:  # only the part already seen counts as seen
                once.release(REPLAY_BUCKET, mine, REPLAY_TTL_S)
            return {"duplicate": delivery, "ignored": "this delivery was already received"}
        claimed.append(key)
    actor = f"{host}:{push['sender']}"
    ref = push["ref"]
    name = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    try:
        run = _start_as(actor, repo, name, push["commit"])
    except Exception:  # nothing started: let the host's redelivery try again
        for key in keys:
            once.release(REPLAY_BUCKET, key, REPLAY_TTL_S)
        raise
    log.info("%s push of %s %s by %s: run %s", host, repo, ref, actor, run.id)
    return {"statusCode": 202, "body": {"run_id": run.id, "commit": run.commit, "ref": run.ref,
                                        "delivery": delivery}}  # fmt: skip


def _start_as(actor: str, repo: str, ref: str, commit: str):
    """start_run as the webhook's sender (the audit trail's actor)."""
    from . import auth

    with auth.acting(auth.Principal(actor, "webhook")):
        return start_run(repo, ref, trigger="push", commit=commit)
