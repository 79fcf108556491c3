"""The cache-invalidator function's work: drop cache entries that no longer match a
repository's manifests, and those unused for longer than the retention period.

  POST /        {"repo", "commit" or "ref", "changed": [paths]}   (from the webhook on a push)
  POST /purge   {"service"?, "older_than_days"?, "all"?}          (people: faasci cache purge)
  GET  /        the entries (?service=)                           (faasci cache ls)
  cron          every configured repository checked, then retention
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from pathlib import Path

from . import cache, git, pipeline
from .api import json_body, string_field
from .errors import NotFound, UserError
from .services import dependency_cache
from .settings import settings

log = logging.getLogger("faasci.invalidation")


def retention_days() -> float:
    return float(os.environ.get("CACHE_RETENTION_DAYS", "30"))


def route(event) -> dict:
    parts = [p for p in event.path.split("/") if p]
    if event.method == "GET" and not parts:
        return {"entries": dependency_cache().entries(event.query.get("service") or None)}
    if event.method == "POST" and not parts:
        body = json_body(event)
        changed = body.get("changed")
        if changed is not None and not (
            isinstance(changed, list) and all(isinstance(p, str) for p in changed)
        ):
            raise UserError("changed must be a list of paths", field="changed")
        return check(string_field(body, "repo"),
                     string_field(body, "commit", required=False)
                     or string_field(body, "ref", required=False), changed)  # fmt: skip
    if event.method == "POST" and parts == ["purge"]:
        return purge(json_body(event))
    raise NotFound(f"no route {event.method} {event.path}", field="path")


def check(repo: str, ref: str | None, changed: list[str] | None = None) -> dict:
    """Remove the repository's entries whose key does not match its manifests at `ref`."""
    s = settings()
    s.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=s.workdir, prefix="invalidate-") as scratch:
        resolved = git.resolve(repo, ref, s.snapshots, scratch=Path(scratch))
        spec = pipeline.load(resolved.pipeline_text, resolved.files, resolved.name)
        if spec.cache is None:
            return {"repo": repo, "service": spec.service, "removed": [], "reason": "no cache"}
        checkout = Path(scratch) / "src"
        git.checkout(resolved.source, resolved.commit, checkout)
        service_dir = checkout / resolved.path
        patterns = cache.manifest_patterns(spec.cache, service_dir)
        if changed is not None and not _touches(changed, resolved.path, patterns):
            return {"repo": repo, "service": spec.service, "removed": [],
                    "reason": "no manifest changed"}  # fmt: skip
        key = cache.compute_key(spec.service, spec.cache, service_dir)
    removed = dependency_cache().stale(spec.service, key.value)
    for entry in removed:
        dependency_cache().remove(entry)
    log.info("%s: removed %d stale cache entries", spec.service, len(removed))
    return {"repo": repo, "service": spec.service, "commit": resolved.commit,
            "current": key.value, "removed": [_brief(e) for e in removed]}  # fmt: skip


def _touches(changed: list[str], service_path: str, patterns: list[str]) -> bool:
    """Did the push add, change or remove a file matching a manifest pattern?"""
    prefix = f"{service_path}/" if service_path else ""
    inside = [p.removeprefix(prefix) for p in changed if p.startswith(prefix)]
    return any(fnmatch.fnmatch(p, pattern) for p in inside for pattern in patterns)


def purge(body: dict) -> dict:
    service, days, everything = body.get("service"), body.get("older_than_days"), body.get("all")
    if service is not None and not isinstance(service, str):
        raise UserError("service must be a string", field="service")
    if days is not None and (not isinstance(days, int | float) or days < 0):
        raise UserError("older_than_days must be a non-negative number", field="older_than_days")
    if not (service or days is not None or everything is True):
        raise UserError('say what to purge: "service", "older_than_days" or "all": true',
                        field="body")  # fmt: skip
    store = dependency_cache()
    chosen = store.unused_since(days) if days is not None else store.entries()
    if service:
        chosen = [e for e in chosen if e["service"] == service]
    for entry in chosen:
        store.remove(entry)
    return {"removed": [_brief(e) for e in chosen]}


def scheduled() -> dict:
    """The nightly round: check every configured repository, then apply retention."""
    checked = []
    for repo, ref in settings().scheduled():
        try:
            checked.append(check(repo, ref))
        except Exception as e:  # one broken repository must not stop the round
            checked.append({"repo": repo, "error": str(e)})
    expired = purge({"older_than_days": retention_days()})["removed"]
    return {"trigger": "cron", "checked": checked, "expired": expired,
            "retention_days": retention_days()}  # fmt: skip


def _brief(entry: dict) -> dict:
    return {k: entry[k] for k in ("service", "key", "size", "created", "last_used")}
