"""The cache-invalidator function's work: drop a repository's cache entries that nothing
needs any more, and entries unused for longer than the retention period.

A key is needed while the head of some branch of the repository computes it (for any
stage that uses the cache), or while a run of the repository used it in the last
RECENT_RUN_DAYS. Everything else in the repository's namespace goes. So a push to a
feature branch that changes a manifest never removes the key the main branch uses.

  POST /        {"repo", "commit" or "ref", "changed"?: [paths]}  (internal: a stage, a push)
  POST /purge   {"service"?, "repo"?, "older_than_days"?, "all"?} (admin: faasci cache purge)
  GET  /        the entries (?service=, ?repo=)                   (viewer: faasci cache ls)
  cron          every configured repository checked, then retention
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from . import audit, cache, git, pipeline, runs, services
from .api import Route, json_body, string_field
from .errors import UserError
from .sandbox import stable_service_dir, stage_path
from .settings import settings

log = logging.getLogger("faasci.invalidation")

RECENT_RUN_DAYS = 7


def retention_days() -> float:
    return float(os.environ.get("CACHE_RETENTION_DAYS", "30"))


def _listing(event, principal) -> dict:
    return {"entries": listed(event.query.get("service") or None,
                              event.query.get("repo") or None)}  # fmt: skip


def _check(event, principal) -> dict:
    body = json_body(event)
    changed = body.get("changed")
    if changed is not None and not (
        isinstance(changed, list) and all(isinstance(p, str) for p in changed)
    ):
        raise UserError("changed must be a list of paths", field="changed")
    return check(string_field(body, "repo"),
                 string_field(body, "commit", required=False)
                 or string_field(body, "ref", required=False), changed)  # fmt: skip


# The check is the bundle's own request (a stage's new key, a push); people list and purge.
ROUTES = [
    Route("GET", "/", "viewer", _listing),
    Route("POST", "/", "admin", _check),  # a stage asks after adopting a new key; an admin may too
    Route("POST", "/purge", "admin", lambda event, principal: purge(json_body(event))),
]


def listed(service: str | None = None, repo: str | None = None) -> list[dict]:
    entries = services.dependency_cache().entries(cache.namespace_of(repo) if repo else None)
    return [e for e in entries if service is None or e.get("service") == service]


def check(repo: str, ref: str | None, changed: list[str] | None = None) -> dict:
    """Remove the repository's entries that no branch head and no recent run needs. With
    `changed` (a push's paths), only when one of them is a manifest or the pipeline file."""
    s = settings()
    s.workdir.mkdir(parents=True, exist_ok=True)
    namespace = cache.namespace_of(repo)
    with tempfile.TemporaryDirectory(dir=s.workdir, prefix="invalidate-") as scratch:
        resolved = git.resolve(repo, ref, s.snapshots, scratch=Path(scratch))
        spec = _pipeline_at(resolved)
        result = {"repo": repo, "namespace": namespace, "commit": resolved.commit,
                  "service": spec.service if spec else None, "removed": [], "kept": []}  # fmt: skip
        cspec = spec.cache if spec else None
        patterns = cache.manifest_patterns(cspec, resolved.files) if cspec else []
        if changed is not None and not _touches(changed, resolved.path,
                                                [*patterns, pipeline.FILENAME]):  # fmt: skip
            return {**result, "reason": "no manifest changed"}
        entries = services.dependency_cache().entries(namespace)
        if not entries:
            return {**result, "reason": "no entries"}
        current = _keys(namespace, resolved, spec)
        # Cheapest first: branch heads only when the commit's keys leave entries over, the
        # recent runs only when the branches do.
        needed, unneeded = set(current), [e for e in entries if e["key"] not in current]
        if unneeded:
            repository, heads = _branch_heads(repo, resolved)
            for head in heads:
                branch = _at(resolved, repository, head)
                needed |= _keys(namespace, branch, _pipeline_at(branch))
            unneeded = [e for e in unneeded if e["key"] not in needed]
    if unneeded:
        needed |= recent_keys(namespace)
        unneeded = [e for e in unneeded if e["key"] not in needed]
    for entry in unneeded:
        services.dependency_cache().remove(entry)
    log.info("%s: removed %d cache entries no branch or recent run needs", repo, len(unneeded))
    return {**result, "current": sorted(current),
            "kept": sorted(e["key"] for e in entries if e not in unneeded),
            "removed": [_brief(e) for e in unneeded]}  # fmt: skip


def _at(resolved: git.Resolved, repository: str, commit: str) -> git.Resolved:
    """The same service folder at another commit (read from `repository`)."""
    prefix = f"{resolved.path}/" if resolved.path else ""
    listing = git.git("ls-tree", "--name-only", commit, "--", prefix or ".", cwd=repository)
    files = {os.path.basename(name) for name in listing.splitlines()}
    other = dataclasses.replace(resolved, commit=commit, repository=repository, files=files)
    other.pipeline_text = other.read(pipeline.FILENAME)
    return other


def _pipeline_at(resolved: git.Resolved) -> pipeline.Pipeline | None:
    """The pipeline a run of that commit would have (None when it cannot run)."""
    try:
        return pipeline.load(resolved.pipeline_text, resolved.files, resolved.name, resolved.read)
    except UserError as e:  # a broken pipeline file runs nothing, so needs no cache
        log.info("%s at %s: no pipeline (%s)", resolved.source, resolved.commit[:12], e)
        return None


def _keys(namespace: str, resolved: git.Resolved, spec: pipeline.Pipeline | None) -> set[str]:
    """The keys the stages of that commit compute (one per image used)."""
    if spec is None or spec.cache is None:
        return set()
    s = settings()
    manifests = cache.manifests_at_commit(spec.cache, resolved.repository, resolved.commit,
                                          resolved.path)  # fmt: skip
    path = stage_path(stable_service_dir(resolved.path))  # the PATH its stages probe
    return {
        cache.compute_key(namespace, spec.cache, manifests,
                          cache.stage_runtime(path, s.workspace, stage.image)).value
        for stage in spec.stages.values()
        if stage.cache
    }  # fmt: skip


def _branch_heads(repo: str, resolved: git.Resolved) -> tuple[str, list[str]]:
    """Where the repository's branches are, and their heads: git.resolve's clone of a URL,
    or a local repository's store (both hold every branch; git never runs in a local
    repository itself)."""
    where = resolved.repository
    heads = git.git("for-each-ref", "--format=%(objectname)", "refs/heads/", cwd=where)
    return where, sorted(set(heads.split()) - {resolved.commit})


def recent_keys(namespace: str, days: float = RECENT_RUN_DAYS) -> set[str]:
    """The keys recorded by the repository's runs of the last `days`."""
    found = set()
    for run in _runs_since(days):
        if cache.namespace_of(run.repo) != namespace:
            continue
        for stage in run.stages:
            for attempt in stage.attempts:
                if attempt.cache and attempt.cache.get("key"):
                    found.add(attempt.cache["key"])
    return found


def _runs_since(days: float) -> list[runs.Run]:
    """Runs created in the last `days`."""
    oldest = (runs.now() - timedelta(days=days)).strftime("%Y%m%d-%H%M%S-")
    return services.run_store().list(limit=10**9, since=oldest)


def _touches(changed: list[str], service_path: str, patterns: list[str]) -> bool:
    """Did the push add, change or remove a file matching a manifest pattern?"""
    prefix = f"{service_path}/" if service_path else ""
    inside = [p.removeprefix(prefix) for p in changed if p.startswith(prefix)]
    return any(fnmatch.fnmatch(p, pattern) for p in inside for pattern in patterns)


def purge(body: dict) -> dict:
    service, repo = body.get("service"), body.get("repo")
    days, everything = body.get("older_than_days"), body.get("all")
    for name, value in (("service", service), ("repo", repo)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{name} must be a string", field=name)
    if days is not None and (not isinstance(days, int | float) or days < 0):
        raise UserError("older_than_days must be a non-negative number", field="older_than_days")
    if not (service or repo or days is not None or everything is True):
        raise UserError('say what to purge: "service", "repo", "older_than_days" or '
                        '"all": true', field="body")  # fmt: skip
    store = services.dependency_cache()
    chosen = store.unused_since(days) if days is not None else store.entries()
    if service:
        chosen = [e for e in chosen if e.get("service") == service]
    if repo:
        chosen = [e for e in chosen if e.get("namespace") == cache.namespace_of(repo)]
    asked = {"service": service, "older_than_days": days, "all": everything is True}
    audit.record("cache.purge", repo=repo, detail={**asked, "entries": len(chosen)})
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
    fields = ("namespace", "repo", "service", "key", "size", "created", "last_used")
    return {k: entry.get(k) for k in fields}


def request_check(run: runs.Run) -> None:
    """Once a stage has made a new key (its manifests or runtime changed, whatever started
    the run): have the invalidator check the repository, so what nothing needs goes.
    Asynchronous, and never a reason for the stage to fail."""
    if run.pipeline.cache is None:
        return
    # A snapshot's commit lives only in this function's snapshot store: name the working tree.
    body = {"repo": run.repo} if run.snapshot else {"repo": run.repo, "commit": run.commit}
    try:
        services.gateway().call_async("cache-invalidator", body, call_id=f"{run.id}.invalidate")
    except Exception as e:
        log.warning("run %s: could not ask for a cache check: %s", run.id, e)
