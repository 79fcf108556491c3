"""Registry retention: delete image tags older than FAASCI_RETENTION_DAYS (30) that no
environment references and no recent run promoted, through the registry's own API
(Distribution's HTTP API v2), then let the registry collect the blobs nothing refers to.

What is kept, and why (`kept: [{ref, why}]` in the answer):
  - an image younger than the retention period (its config's `created`), or of unknown age;
  - an image whose digest is in the HEAD of an environment repository: the `gitops`
    repository (and branch) of the promote stage of any run of the last RETENTION days,
    plus FAASCI_ENV_REPOS; every file is searched for `sha256:<64 hex>`, whatever its format;
  - an image a run of the last RETENTION days promoted (its `image` where promote passed).
Deleting is by manifest digest (DELETE /v2/<name>/manifests/<digest>), which removes every
tag of that digest, so a digest goes only when each of its tags may go. An environment
repository that cannot be read stops the round before anything is deleted: an unknown
reference is never taken for none.

Then the blobs: `docker-registry garbage-collect <config>` (FAASCI_REGISTRY_CONFIG, the
local stack's registry.yml, whose `storage.delete.enabled` is true). Distribution says to
collect while the registry takes no pushes: a blob uploaded for a manifest not yet put
would be swept. faas-ci's registry is pushed to by build stages only, so the collection
runs only while no build stage is running (checked just before), and otherwise waits for
the next round (`gc: "deferred"`); a build that starts meanwhile and loses a blob fails its
push as `infra` and is retried, never stored broken. Without FAASCI_REGISTRY_CONFIG (a
cluster's registry, whose storage this function cannot reach) the tags are deleted and the
registry's own garbage-collect job frees the space.

  POST /  ?dry_run=1   a round now (admin); dry-run: what would be deleted, nothing is
  cron                 the nightly round
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
import yaml
from pydantic import BaseModel

from .api import Route
from .errors import UserError
from .registry import DIGEST_RE, Image, Registry
from .settings import settings

log = logging.getLogger("faasci.retention")


def retention_days() -> float:
    return float(os.environ.get("FAASCI_RETENTION_DAYS", "30"))


class Decision(BaseModel):
    delete: list[Image]
    kept: list[dict]


def decide(images: list[Image], referenced: set[str], promoted: set[str], now: datetime,
           days: float) -> Decision:  # fmt: skip
    """The policy, on plain data: what goes and what stays (with why)."""
    cutoff = now - timedelta(days=days)
    delete, kept = [], []
    for image in images:
        names = ", ".join(f"{image.repository}:{t}" for t in image.tags) or image.ref
        if image.digest in referenced:
            why = "referenced by an environment repository"
        elif image.digest in promoted:
            why = f"promoted by a run of the last {days:g} days"
        elif image.created is None:
            why = "its age is unknown (no created date in its config)"
        elif image.created > cutoff:
            why = f"younger than {days:g} days (created {image.created.isoformat()})"
        else:
            delete.append(image)
            continue
        kept.append({"ref": names, "digest": image.digest, "why": why})
    return Decision(delete=delete, kept=kept)


# What is in use.


class Unreadable(Exception):
    """An environment repository could not be read: nothing may be deleted this round."""


def environment_repositories(recent) -> set[tuple[str, str]]:
    """(repository, branch) of each recent run's promote stage's `gitops` (the platform's
    repository when it names none), the platform's, and FAASCI_ENV_REPOS (`<git
    URL>[#<branch>]`, space-separated)."""
    platform = settings().gitops_repository
    found = {(platform, "main")} if platform else set()
    for run in recent:
        spec = run.pipeline.stages.get("promote")
        if spec and spec.gitops and (spec.gitops.repository or platform):
            found.add((spec.gitops.repository or platform, spec.gitops.branch))
    for item in os.environ.get("FAASCI_ENV_REPOS", "").split():
        repo, _, branch = item.partition("#")
        found.add((repo, branch or "main"))
    return found


def digests_in(repository: str, branch: str, scratch: Path) -> set[str]:
    """Every `sha256:<hex>` in the files at the HEAD of the repository's branch."""
    target = scratch / f"env-{len(list(scratch.iterdir()))}"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--single-branch",
                           "--branch", branch, "--", repository, str(target)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    if done.returncode != 0:
        raise Unreadable(f"environment repository {repository} ({branch}) could not be read: "
                         f"{done.stderr.strip()[-300:]}")  # fmt: skip
    found = set()
    for path in target.rglob("*"):
        if ".git" in path.relative_to(target).parts or not path.is_file():
            continue
        found |= set(DIGEST_RE.findall(path.read_bytes().decode("utf-8", "replace")))
    return found


def promoted_digests(recent) -> set[str]:
    """The digests recent runs promoted: the run's image where its promote stage passed
    (and what the promotion record names)."""
    found = set()
    for run in recent:
        try:
            stage = run.stage("promote")
        except Exception:  # no promote stage in this run
            continue
        if stage.status != "passed":
            continue
        named = [(getattr(a, "promotion", None) or {}).get("image") for a in stage.attempts]
        for ref in [run.image, *named]:
            found |= set(DIGEST_RE.findall(ref or ""))
    return found


def recent_runs(days: float) -> list:
    from . import runs, services

    oldest = (runs.now() - timedelta(days=days)).strftime("%Y%m%d-%H%M%S-")
    return services.run_store().list(limit=10**9, since=oldest)


def builds_running(recent) -> list[str]:
    return [r.id for r in recent if not r.finished and any(
        s.name == "build" and s.status in ("queued", "running") for s in r.stages)]  # fmt: skip


# Blobs.


def storage_root(config: Path) -> Path | None:
    """The filesystem driver's root folder of a registry configuration (None: another
    driver, whose size this function cannot measure)."""
    data = yaml.safe_load(config.read_text()) or {}
    root = ((data.get("storage") or {}).get("filesystem") or {}).get("rootdirectory")
    return Path(root) if root else None


def disk_usage(root: Path | None) -> int | None:
    if root is None or not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def collect() -> dict:
    """Run the registry's garbage collection (see the module's doc for when)."""
    config = os.environ.get("FAASCI_REGISTRY_CONFIG")
    binary = shutil.which("docker-registry")
    if not config or not Path(config).is_file() or not binary:
        return {"gc": "not here: the registry's own garbage-collect job frees the space"}
    pushing = builds_running(recent_runs(1))
    if pushing:
        return {"gc": f"deferred: build stages are pushing ({', '.join(pushing)})"}
    root = storage_root(Path(config))
    before = disk_usage(root)
    done = subprocess.run([binary, "garbage-collect", config], capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    if done.returncode != 0:
        return {"gc": f"failed: {(done.stderr or done.stdout).strip()[-500:]}"}
    after = disk_usage(root)
    freed = before - after if before is not None and after is not None else None
    return {"gc": "collected", "freed_bytes": freed}


def round_(dry_run: bool = False, registry: Registry | None = None) -> dict:
    """One retention round: decide, delete (unless `dry_run`), collect."""
    days = retention_days()
    registry = registry or Registry.from_env()
    recent = recent_runs(days)
    referenced: set[str] = set()
    s = settings()
    s.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=s.workdir, prefix="retention-") as scratch:
        for repository, branch in sorted(environment_repositories(recent)):
            referenced |= digests_in(repository, branch, Path(scratch))
    images = registry.images()
    decision = decide(images, referenced, promoted_digests(recent), datetime.now(UTC), days)
    deleted = [{"ref": i.ref, "tags": i.tags, "created": i.created.isoformat(), "size": i.size}
               for i in decision.delete]  # fmt: skip
    result = {"dry_run": dry_run, "retention_days": days, "deleted": deleted,
              "kept": decision.kept}  # fmt: skip
    if dry_run:
        return {**result, "would_free_bytes": sum(i.size for i in decision.delete)}
    for image in decision.delete:
        registry.delete(image.repository, image.digest)
        log.info("deleted %s (tags %s)", image.ref, ", ".join(image.tags))
    if decision.delete:
        from . import audit

        audit.record("registry.retention", detail={"deleted": [i.ref for i in decision.delete]})
        result.update(collect())
    return result


class Blocked(UserError):
    """The round could not see every reference (an environment repository, the registry):
    nothing was deleted. 503: try again."""

    status = 503


def _guarded(dry_run: bool) -> dict:
    try:
        return round_(dry_run)
    except Unreadable as e:
        raise Blocked(f"nothing deleted: {e}", field="environment") from None
    except requests.RequestException as e:
        raise Blocked(f"nothing deleted: the registry did not answer: {e}",
                      field="FAASCI_REGISTRY") from None  # fmt: skip


def _invoke(event, principal) -> dict:
    raw = event.query.get("dry_run", "0")
    if raw not in ("0", "1", "true", "false"):
        raise UserError("dry_run must be 1 or 0", field="dry_run")
    return _guarded(raw in ("1", "true"))


def scheduled() -> dict:
    return {"trigger": "cron", **_guarded(False)}


ROUTES = [Route("POST", "/", "admin", _invoke)]
