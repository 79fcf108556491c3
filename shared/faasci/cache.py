"""Dependency caches: whose they are, what they are keyed by, and their archives in S3.

A cache belongs to a repository (its namespace is the repository's normalized identity,
never the `service:` name a pipeline file declares, so one repository cannot fill
another's cache). Its key hashes what the cached paths depend on: the manifests'
contents, the stage's runtime (OS, architecture, the workspace path the tools were
installed at, the image, the Python and Node a stage finds on its PATH), the set-up and
the paths. Keys are content addresses: a stale key is never wrong, only wasted space.

In S3 an entry is a zstd-compressed tar (`cache/<namespace>/<key>.tar.zst`, written to
disk then uploaded in parts, never whole in memory, with its sha256 in the object's own
metadata) and a small JSON entry beside it for `faasci cache ls`, invalidation and
retention. S3 shows an object only once its upload is complete, so two stages saving one
key at once leave one whole archive. A restore streams the archive through zstd into GNU
tar and checks the sha256 at the end: a corrupt or truncated archive is a miss. The
node-local layer of unpacked entries in front of S3 is faasci.nodecache.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

import zstandard
from pydantic import BaseModel

from . import git
from .defaults import DEFAULT_MANIFESTS, project_type
from .errors import NotFound
from .pipeline import CacheSpec

if TYPE_CHECKING:  # boto3 loads with the store itself (faasci.services)
    from .objects import ObjectStore

log = logging.getLogger("faasci.cache")

PREFIX = "cache"
# Level 3: 15% smaller than level 1 for about the same time; unpacking costs the same at any
# level (the file system, not zstd, is the bottleneck there). One thread: packing runs in
# the background of a stage's commands, which must not wait for it.
ZSTD_LEVEL = 3


class CacheReport(BaseModel):
    """What the cache did for one attempt (recorded in the run)."""

    key: str
    hit: bool
    reason: str | None = None  # why a miss: "absent", "corrupt", "unavailable"
    source: str | None = None  # where a hit came from: "local" (this node) or "s3"
    restored_bytes: int = 0
    saved_bytes: int = 0
    restore_s: float = 0
    setup_s: float = 0
    save_s: float = 0


class CorruptArchive(Exception):
    """An archive that does not match its checksum or does not unpack."""


# Whose cache: the repository's identity.


def normalize_repo(repo: str) -> str:
    """One spelling per repository: scheme and host lowercased, HTTP credentials, default
    ports, a trailing `/` and `.git` dropped; `git@host:owner/name` is
    `ssh://git@host/owner/name`; a local path (or file:// URL) is its real path.

    Only what never changes which repository git fetches is dropped: an SSH user is kept
    (`alice@host:repo` and `bob@host:repo` are two home folders), and so are a query and a
    fragment (a server may serve other content for them), so no spelling of one repository
    can name another's namespace."""
    scp = re.fullmatch(r"([\w.-]+@)?([\w.-]+):(?!//)(.+)", repo)
    if scp and not os.path.isabs(repo):
        repo = f"ssh://{scp.group(1) or ''}{scp.group(2)}/{scp.group(3).lstrip('/')}"
    parts = urlsplit(repo)
    extra = (f"?{parts.query}" if parts.query else "") + (
        f"#{parts.fragment}" if parts.fragment else ""
    )
    if parts.scheme.lower() == "file" or not parts.scheme:
        return os.path.realpath(parts.path) + extra if parts.scheme else os.path.realpath(repo)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    default_port = {"ssh": 22, "http": 80, "https": 443, "git": 9418}.get(scheme)
    port = f":{parts.port}" if parts.port and parts.port != default_port else ""
    user = f"{parts.username}@" if scheme == "ssh" and parts.username else ""
    path = parts.path.rstrip("/").removesuffix(".git").rstrip("/")
    return f"{scheme}://{user}{host}{port}{path}{extra}"


def namespace_of(repo: str) -> str:
    """`<name>-<16 hex>`: readable, and unique per repository."""
    normalized = normalize_repo(repo)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", normalized.rstrip("/").rsplit("/", 1)[-1])
    base = base.strip(".-")[:40] or "repo"
    return f"{base}-{hashlib.sha256(normalized.encode()).hexdigest()[:16]}"


# What the cache is keyed by.


@dataclass(frozen=True)
class CacheKey:
    namespace: str
    value: str  # hex digest
    manifests: dict[str, str]  # path -> sha256 of its contents
    runtime: dict[str, str]

    @property
    def archive(self) -> str:
        return object_name(self.namespace, self.value, "tar.zst")

    @property
    def entry(self) -> str:
        return object_name(self.namespace, self.value, "json")


def object_name(namespace: str, key: str, suffix: str) -> str:
    """Where a cache's archive ("tar.zst") or its entry ("json") lives in S3."""
    return f"{PREFIX}/{namespace}/{key}.{suffix}"


def compute_key(namespace: str, spec: CacheSpec, manifests: dict[str, bytes],
                runtime: dict[str, str]) -> CacheKey:  # fmt: skip
    """The same manifests, runtime, set-up and paths give the same key, anywhere. `prepare`
    is left out: it runs in every stage, after the restore."""
    digests = {path: hashlib.sha256(data).hexdigest() for path, data in sorted(manifests.items())}
    basis = json.dumps({"manifests": digests, "runtime": runtime, "setup": spec.setup,
                        "paths": spec.paths}, sort_keys=True)  # fmt: skip
    return CacheKey(namespace, hashlib.sha256(basis.encode()).hexdigest()[:32], digests, runtime)


def manifest_patterns(spec: CacheSpec, files: set[str]) -> list[str]:
    """The pipeline's manifests, or the defaults of the project's type (from the names at
    the service folder's top level)."""
    return spec.manifests or DEFAULT_MANIFESTS.get(project_type(files) or "", [])


def manifests_in_dir(spec: CacheSpec, service_dir: Path) -> dict[str, bytes]:
    """The manifests of a checkout, by path relative to the service folder."""
    files = {p.name for p in service_dir.iterdir()} if service_dir.is_dir() else set()
    found = {
        os.path.relpath(match, service_dir)
        for pattern in manifest_patterns(spec, files)
        for match in glob.glob(str(service_dir / pattern))
        if os.path.isfile(match)
    }
    return {path: (service_dir / path).read_bytes() for path in sorted(found)}


def manifests_at_commit(spec: CacheSpec, repository: str, commit: str,
                        service_path: str = "") -> dict[str, bytes]:  # fmt: skip
    """The manifests of `commit` in a local repository (bare or not), without a checkout:
    the same as manifests_in_dir gives for its checkout."""
    prefix = f"{service_path}/" if service_path else ""
    listing = git.git("ls-tree", "-r", "--name-only", "-z", commit, "--", prefix or ".",
                      cwd=repository, strip=False)  # fmt: skip
    paths = [p.removeprefix(prefix) for p in listing.split("\0") if p]
    patterns = manifest_patterns(spec, {p.split("/", 1)[0] for p in paths})
    chosen = sorted(p for p in paths if any(_glob_match(p, pattern) for pattern in patterns))
    return dict(zip(chosen, _blobs(repository, [f"{commit}:{prefix}{p}" for p in chosen]),
                    strict=True))  # fmt: skip


def _glob_match(path: str, pattern: str) -> bool:
    """glob.glob's matching of one path: segment by segment, and a leading dot only
    matched by a pattern that says it."""
    names, parts = path.split("/"), pattern.split("/")
    return len(names) == len(parts) and all(
        fnmatch.fnmatchcase(name, part) and (part.startswith(".") or not name.startswith("."))
        for name, part in zip(names, parts, strict=True)
    )


def _blobs(repository: str, objects: list[str]) -> list[bytes]:
    """Files' exact bytes (git.git() returns text: CRLF and non-UTF-8 would change the key)."""
    if not objects:
        return []
    done = subprocess.run(
        ["git", "cat-file", "--batch"], cwd=repository, capture_output=True, check=False,
        input="".join(f"{o}\n" for o in objects).encode(), env=git.git_env(),
        timeout=git.NETWORK_TIMEOUT,
    )  # fmt: skip
    if done.returncode != 0:
        raise git.GitError(f"git cat-file: {done.stderr.decode(errors='replace')[-300:]}")
    out, at, found = done.stdout, 0, []
    for name in objects:
        header_end = out.index(b"\n", at)
        header = out[at:header_end].split()
        if header[-1] == b"missing":
            raise git.GitError(f"git cat-file: {name} missing")
        size = int(header[2])
        found.append(out[header_end + 1 : header_end + 1 + size])
        at = header_end + 1 + size + 1  # the blob, then a newline
    return found


# The stage runtime: what a cache made by a stage depends on besides its manifests.

_versions: dict[tuple[str, int], str] = {}
_versions_lock = threading.Lock()
PROBES = {
    "python3": ["-c", "import sys;print(sys.version.split()[0])"],
    "node": ["--version"],
}


def stage_runtime(path: str, workspace: Path, image: str | None = None) -> dict[str, str]:
    """The OS, architecture and workspace path; with an image, the image (its tools are
    its own); without, the Python and Node a stage's PATH finds (real path and version,
    measured once per interpreter file). Never faas-ci's own interpreter."""
    facts = {"os": _os_release(), "arch": platform.machine(), "workspace": str(workspace)}
    if image:
        facts["image"] = image
        return facts
    for tool, args in PROBES.items():
        found = shutil.which(tool, path=path)
        if found:
            real = os.path.realpath(found)
            facts[tool] = f"{real} {_version(real, args, path)}"
    return facts


def _version(real: str, args: list[str], path: str) -> str:
    memo = (real, os.stat(real).st_mtime_ns)
    with _versions_lock:
        if memo in _versions:
            return _versions[memo]
    try:
        done = subprocess.run([real, *args], capture_output=True, text=True, timeout=30,
                              env={"PATH": path, "LANG": "C.UTF-8"},
                              stdin=subprocess.DEVNULL)  # fmt: skip
        version = done.stdout.strip() or f"exit {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        version = f"unknown ({type(e).__name__})"
    with _versions_lock:
        _versions[memo] = version
    return version


@functools.cache
def _os_release() -> str:
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
        fields = dict(line.split("=", 1) for line in lines if "=" in line)
        return "-".join(fields.get(k, "").strip('"') for k in ("ID", "VERSION_ID"))
    except OSError:
        return platform.system().lower()


def split_path(path: str) -> tuple[str, str]:
    """A cached path's root ("work": the service folder, "home": HOME) and its rest."""
    return ("home", path[2:]) if path.startswith("~/") else ("work", path)


# The archive format: tar through zstd. GNU tar is several times faster than tarfile on a
# virtualenv's thousands of files; it refuses member names with `..`, strips leading
# slashes, and gives the files our own owner.


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


class _HashingReader:
    """A readable stream (an S3 body) that hashes and counts what is read from it."""

    def __init__(self, body):
        self.body, self.digest, self.size = body, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.body.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def pack(folder: Path, archive: Path) -> tuple[int, str]:
    """Archive `folder`'s `work/` and `home/` trees; (size, sha256) of the archive."""
    members = [name for name in ("work", "home") if (folder / name).exists()]
    with tempfile.TemporaryFile() as errors, archive.open("wb") as raw:
        tar = subprocess.Popen(
            ["tar", "--create", "--file", "-", "--directory", str(folder), "--", *members],
            stdout=subprocess.PIPE, stderr=errors,
        )  # fmt: skip
        out = _Hashing(raw)
        zstandard.ZstdCompressor(level=ZSTD_LEVEL).copy_stream(tar.stdout, out)
        tar.stdout.close()
        if tar.wait() != 0:
            errors.seek(0)
            raise OSError(f"tar: {errors.read().decode(errors='replace').strip()[-300:]}")
    return out.size, out.digest.hexdigest()


def unpack(stream, into: Path) -> None:
    """Unpack an archive read from `stream` into the existing folder `into`."""
    with tempfile.TemporaryFile() as errors:
        tar = subprocess.Popen(
            ["tar", "--extract", "--file", "-", "--directory", str(into), "--no-same-owner",
             "--no-overwrite-dir"],
            stdin=subprocess.PIPE, stderr=errors,
        )  # fmt: skip
        try:
            zstandard.ZstdDecompressor().copy_stream(stream, tar.stdin)
            tar.stdin.close()
        except BrokenPipeError:  # tar stopped reading: its exit says why
            pass
        except zstandard.ZstdError as e:
            tar.kill()
            raise CorruptArchive(f"zstd: {e}") from None
        finally:
            with contextlib.suppress(BrokenPipeError):
                tar.stdin.close()
            code = tar.wait()
        if code != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip()[-300:]
            raise CorruptArchive(f"tar: {message or f'exit {code}'}")


# The S3 side.


class DependencyCache:
    """Archives and their entries in S3: restore, save, and management (listing,
    invalidation, retention)."""

    def __init__(self, objects: ObjectStore):
        self.objects = objects

    def download(self, key: CacheKey, into: Path) -> int:
        """Unpack the key's archive into the existing folder `into`, streaming (download,
        decompression and unpacking overlap); the archive's size. NotFound when there is
        none; CorruptArchive when it does not check out (`into` then holds rubbish)."""
        from botocore.exceptions import ClientError

        self.objects.ensure_bucket()
        try:
            resp = self.objects.client.get_object(Bucket=self.objects.bucket, Key=key.archive)
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                raise NotFound(f"no object {key.archive!r}") from None
            raise
        reader = _HashingReader(resp["Body"])
        try:
            unpack(reader, into)
            while reader.read(1 << 20):  # what tar left unread (padding) counts in the sum too
                pass
        finally:
            resp["Body"].close()
        if resp.get("Metadata", {}).get("sha256") != reader.digest.hexdigest():
            raise CorruptArchive(f"{key.archive}: checksum mismatch")
        return reader.size

    def upload(self, key: CacheKey, folder: Path, scratch: Path, *, paths: list[str],
               service: str = "", repo: str = "", unpacked_bytes: int = 0) -> int:  # fmt: skip
        """Archive an entry folder (`work/`, `home/`) and upload it under the key, then its
        JSON entry; the archive's size."""
        scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch, prefix=f"{key.value}-", suffix=".tar.zst")
        os.close(fd)
        archive = Path(name)
        try:
            size, digest = pack(folder, archive)
            metadata = {"sha256": digest, "namespace": key.namespace}
            self.objects.put_file(
                key.archive, archive, content_type="application/zstd", metadata=metadata
            )
        finally:
            archive.unlink(missing_ok=True)
        now = _now()
        self.objects.put_json(key.entry, {
            "namespace": key.namespace, "repo": repo, "service": service or key.namespace,
            "key": key.value, "archive": key.archive, "manifests": key.manifests,
            "runtime": key.runtime, "paths": paths, "created": now, "last_used": now,
            "size": size, "unpacked_bytes": unpacked_bytes, "sha256": digest,
        })  # fmt: skip
        return size

    def touch(self, key: CacheKey) -> None:
        """Record a use (for retention)."""
        try:
            entry = self.objects.get_json(key.entry)
            entry["last_used"] = _now()
            self.objects.put_json(key.entry, entry)
        except Exception as e:  # last_used is for retention; a hit matters more
            log.warning("cache %s: could not record its use: %s", key.entry, e)

    # Management: listing, invalidation, retention.

    def entries(self, namespace: str | None = None) -> list[dict]:
        prefix = f"{PREFIX}/{namespace}/" if namespace else f"{PREFIX}/"
        found = []
        for name in self.objects.keys(prefix):
            if name.endswith(".json"):
                with contextlib.suppress(NotFound):  # removed meanwhile
                    found.append(self.objects.get_json(name))
        return sorted(found, key=lambda e: (e.get("service", ""), e["created"]))

    def remove(self, entry: dict) -> None:
        archive = entry["archive"]  # also takes entries of the gzip era (<service>/<key>.tar.gz)
        self.objects.delete(archive, archive.rsplit(".tar.", 1)[0] + ".json")

    def unused_since(self, days: float, now: datetime | None = None) -> list[dict]:
        limit = (now or datetime.now(UTC)) - timedelta(days=days)
        return [e for e in self.entries() if datetime.fromisoformat(e["last_used"]) < limit]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
