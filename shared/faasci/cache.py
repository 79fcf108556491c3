"""Dependency caches in S3, keyed by the manifests' contents and the runtime.

Before a stage's commands the cache is restored when its key exists; on a miss the
pipeline's set-up commands run and what they filled is saved. An archive is a gzipped tar
written to disk and uploaded in parts (never whole in memory) with its sha256 in the
object's own metadata, so a restore can tell a corrupt or truncated archive and treat it
as a miss. S3 shows an object only once its upload is complete, so two runs saving one
key at once leave one whole archive, never a mixed one. Beside each archive a small JSON
entry holds what `faasci cache ls` and retention need (created, last used, size).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from . import shell
from .errors import NotFound
from .objects import ObjectStore
from .pipeline import DEFAULT_MANIFESTS, CacheSpec, project_type

log = logging.getLogger("faasci.cache")

PREFIX = "cache"


class CacheReport(BaseModel):
    """What the cache did for one attempt (recorded in the run)."""

    key: str
    hit: bool
    reason: str | None = None  # why a miss: "absent", "corrupt", "unavailable"
    restored_bytes: int = 0
    saved_bytes: int = 0
    restore_s: float = 0
    setup_s: float = 0
    save_s: float = 0


@dataclass
class CacheKey:
    service: str
    value: str  # hex digest
    manifests: dict[str, str]  # path -> sha256 of its contents
    runtime: dict[str, str]

    @property
    def archive(self) -> str:
        return object_name(self.service, self.value, "tar.gz")

    @property
    def entry(self) -> str:
        return object_name(self.service, self.value, "json")


def object_name(service: str, key: str, suffix: str) -> str:
    """Where a cache's archive ("tar.gz") or its entry ("json") lives in S3."""
    return f"{PREFIX}/{service}/{key}.{suffix}"


def runtime(kind: str | None) -> dict[str, str]:
    """What a cache built here depends on besides the manifests."""
    facts = {"os": _os_release(), "arch": platform.machine(),
             "python": f"{sys.version_info.major}.{sys.version_info.minor}"}  # fmt: skip
    if kind == "node" and shutil.which("node"):
        facts["node"] = subprocess.run(["node", "--version"], capture_output=True,
                                       text=True).stdout.strip()  # fmt: skip
    return facts


def _os_release() -> str:
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
        fields = dict(line.split("=", 1) for line in lines if "=" in line)
        return "-".join(fields.get(k, "").strip('"') for k in ("ID", "VERSION_ID"))
    except OSError:
        return platform.system().lower()


def project_kind(service_dir: Path) -> str | None:
    return project_type({p.name for p in service_dir.iterdir()} if service_dir.is_dir() else set())


def manifest_patterns(spec: CacheSpec, service_dir: Path) -> list[str]:
    """The pipeline's manifests, or the defaults of the project's type."""
    return spec.manifests or DEFAULT_MANIFESTS.get(project_kind(service_dir) or "", [])


def manifest_paths(spec: CacheSpec, service_dir: Path) -> list[str]:
    patterns = manifest_patterns(spec, service_dir)
    found = {
        os.path.relpath(match, service_dir)
        for pattern in patterns
        for match in glob.glob(str(service_dir / pattern))
        if os.path.isfile(match)
    }
    return sorted(found)


def compute_key(service: str, spec: CacheSpec, service_dir: Path) -> CacheKey:
    """The same manifests, runtime, set-up and paths give the same key, anywhere."""
    manifests = {
        path: hashlib.sha256((service_dir / path).read_bytes()).hexdigest()
        for path in manifest_paths(spec, service_dir)
    }
    facts = runtime(project_kind(service_dir))
    basis = json.dumps({"manifests": manifests, "runtime": facts, "setup": spec.setup,
                        "paths": spec.paths}, sort_keys=True)  # fmt: skip
    return CacheKey(service, hashlib.sha256(basis.encode()).hexdigest()[:32], manifests, facts)


class _Hashing:
    """A writable file that also hashes and counts what goes through it."""

    def __init__(self, out: BinaryIO):
        self.out, self.digest, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _unpack(archive: Path, into: Path) -> None:
    """GNU tar: several times faster than tarfile on a virtualenv's thousands of files. It
    refuses member names with `..` and strips leading slashes; files get our own owner."""
    into.mkdir()
    done = subprocess.run(
        ["tar", "--extract", "--gzip", "--file", str(archive), "--directory", str(into),
         "--no-same-owner", "--no-overwrite-dir"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise ValueError(f"tar: {done.stderr.strip()[-300:]}")


def _roots(service_dir: Path, home: Path) -> dict[str, Path]:
    return {"work": service_dir, "home": home}


def _split(path: str) -> tuple[str, str]:
    return ("home", path[2:]) if path.startswith("~/") else ("work", path)


class DependencyCache:
    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def restore(self, key: CacheKey, paths: list[str], service_dir: Path, home: Path,
                scratch: Path) -> tuple[bool, str | None, int]:  # fmt: skip
        """Put the cached `paths` in place: (hit, reason for a miss, bytes restored)."""
        archive = scratch / "restore.tar.gz"
        try:
            metadata, digest = self.objects.download(key.archive, archive)
        except NotFound:
            return False, "absent", 0
        unpacked = scratch / "restore"
        try:
            if metadata.get("sha256") != digest:
                log.warning("cache %s: checksum mismatch; treating as a miss", key.archive)
                return False, "corrupt", 0
            _unpack(archive, unpacked)
            # Everything unpacked cleanly: only now do the cached paths move into place.
            roots = _roots(service_dir, home)
            for path in paths:
                root, rel = _split(path)
                source, target = unpacked / root / rel, roots[root] / rel
                if not (source.exists() or source.is_symlink()):
                    continue  # the set-up did not make this one
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(source, target)
            size = archive.stat().st_size
        except (ValueError, OSError) as e:  # truncated or damaged gzip/tar
            log.warning("cache %s unreadable (%s); treating as a miss", key.archive, e)
            return False, "corrupt", 0
        finally:
            archive.unlink(missing_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)
        self._touch(key)
        return True, None, size

    def save(self, key: CacheKey, paths: list[str], service_dir: Path, home: Path,
             scratch: Path) -> int:  # fmt: skip
        """Archive `paths` and upload them under the key; the archive's size."""
        archive = scratch / "save.tar.gz"
        roots = _roots(service_dir, home)
        with archive.open("wb") as raw:
            out = _Hashing(raw)
            # gzip level 3: most of level 9's size at a fraction of its time
            with (
                gzip.GzipFile(fileobj=out, mode="wb", compresslevel=3) as gz,
                tarfile.open(fileobj=gz, mode="w|") as tar,
            ):
                for path in paths:
                    root, rel = _split(path)
                    source = roots[root] / rel
                    if source.exists() or source.is_symlink():
                        tar.add(source, arcname=f"{root}/{rel}")
        size, digest = out.size, out.digest.hexdigest()
        try:
            self.objects.put_file(key.archive, archive, content_type="application/gzip",
                                  metadata={"sha256": digest, "service": key.service})  # fmt: skip
        finally:
            archive.unlink(missing_ok=True)
        now = _now()
        self.objects.put_json(key.entry, {
            "service": key.service, "key": key.value, "archive": key.archive,
            "manifests": key.manifests, "runtime": key.runtime, "paths": paths,
            "created": now, "last_used": now, "size": size, "sha256": digest,
        })  # fmt: skip
        return size

    def _touch(self, key: CacheKey) -> None:
        try:
            entry = self.objects.get_json(key.entry)
            entry["last_used"] = _now()
            self.objects.put_json(key.entry, entry)
        except Exception as e:  # last_used is for retention; a hit matters more
            log.warning("cache %s: could not record its use: %s", key.entry, e)

    # Management: listing, invalidation, retention.

    def entries(self, service: str | None = None) -> list[dict]:
        prefix = f"{PREFIX}/{service}/" if service else f"{PREFIX}/"
        found = []
        for name in self.objects.keys(prefix):
            if name.endswith(".json"):
                with contextlib.suppress(NotFound):  # removed meanwhile
                    found.append(self.objects.get_json(name))
        return sorted(found, key=lambda e: (e["service"], e["created"]))

    def remove(self, entry: dict) -> None:
        self.objects.delete(entry["archive"], object_name(entry["service"], entry["key"], "json"))

    def stale(self, service: str, current: str) -> list[dict]:
        """A service's entries whose key is not the current one."""
        return [e for e in self.entries(service) if e["key"] != current]

    def unused_since(self, days: float, now: datetime | None = None) -> list[dict]:
        limit = (now or datetime.now(UTC)) - timedelta(days=days)
        return [e for e in self.entries() if datetime.fromisoformat(e["last_used"]) < limit]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def prepare(
    cache: DependencyCache, key: CacheKey, spec: CacheSpec, service_dir: Path, home: Path,
    scratch: Path, env: dict[str, str], timeout: float, log_out: BinaryIO,
    cancel: threading.Event, pgid_file: Path,
) -> tuple[CacheReport, shell.Outcome]:  # fmt: skip
    """Restore the dependencies, or fill them with the set-up commands and save them.
    The set-up's outcome is returned (passed when nothing had to run)."""

    def say(line: str) -> None:
        log_out.write(f"[faas-ci] {line}\n".encode())
        log_out.flush()

    report = CacheReport(key=key.value, hit=False)
    started = time.monotonic()
    try:
        hit, reason, size = cache.restore(key, spec.paths, service_dir, home, scratch)
    except Exception as e:  # S3 away: build without the cache rather than fail the run
        hit, reason, size = False, "unavailable", 0
        log.warning("cache restore failed: %s", e)
    report.hit, report.reason, report.restored_bytes = hit, reason, size
    report.restore_s = round(time.monotonic() - started, 3)
    if hit:
        say(f"cache hit {key.value[:12]}: restored {size} bytes in {report.restore_s:.2f}s; "
            "set-up skipped")  # fmt: skip
        return report, shell.Outcome(exit_code=0)
    say(f"cache miss {key.value[:12]} ({reason}): running the set-up")
    started = time.monotonic()
    outcome = shell.run_commands(spec.setup, service_dir, env, timeout, log_out, cancel=cancel,
                                 pgid_file=pgid_file)  # fmt: skip
    report.setup_s = round(time.monotonic() - started, 3)
    if not outcome.passed:
        return report, outcome
    started = time.monotonic()
    try:
        report.saved_bytes = cache.save(key, spec.paths, service_dir, home, scratch)
        report.save_s = round(time.monotonic() - started, 3)
        say(f"cache saved {key.value[:12]}: {report.saved_bytes} bytes in {report.save_s:.2f}s")
    except Exception as e:  # the stage can go on without a saved cache
        log.warning("cache save failed: %s", e)
        say(f"cache not saved: {e}")
    return report, outcome
