"""The node-local layer of dependency caches: unpacked entries in front of the S3 archives.

The first stage on a node that needs a key unpacks it from S3; every later stage of any
run on the node finds it here in a few milliseconds and overlay-mounts its paths (the
entry is the read-only lower layer: a stage never changes it). On a miss the stage runs
the set-up and hands what it made to `adopt`, which moves it in as the entry (a rename,
no copy) and uploads its archive for the other nodes.

Layout under the cache folder (one per node, shared by every function process on it):

    <namespace>/<key>/work/<path>   paths in the service folder
    <namespace>/<key>/home/<path>   paths under ~/
    <namespace>/<key>/.lock         flock()ed shared by each stage using the entry; its
                                    mtime is the entry's last use (LRU)
    <namespace>/<key>/.bytes        the entry's size on disk
    .tmp/                           entries being made (same file system: renamed in)
    .trash/                         entries being removed

An entry appears whole or not at all: it is made in .tmp/ and renamed into place; when two
stages make one key at once the first rename wins and the other uses the winner's. An
entry is removed by first taking its lock exclusively (never while a stage holds it),
renaming it into .trash/ and only then deleting it; a stage that opened the lock just
before sees the lock file gone from the entry's path and treats the key as absent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import tracing
from .cache import CacheKey, CorruptArchive, DependencyCache, split_path
from .errors import NotFound

log = logging.getLogger("faasci.nodecache")

LOCK, BYTES, TOUCHED = ".lock", ".bytes", ".touched"
TOUCH_EVERY_S = 3600  # S3's last_used serves a 30-day retention: once an hour is plenty
STALE_TMP_S = 6 * 3600  # a half-made entry older than the longest set-up is abandoned


@dataclass
class Entry:
    """An entry in use: its folder (`work/`, `home/`), where it came from ("local": this
    node, "s3": unpacked from S3 just now, "setup": adopted from this stage's set-up) and
    what it cost."""

    key: str
    root: Path
    source: str
    size: int = 0  # bytes on disk, unpacked
    restored_bytes: int = 0  # the entry's size when restored, 0 when adopted
    restore_s: float = 0
    saved_bytes: int = 0  # the archive's size, once uploaded by adopt (0 if it failed)
    save_s: float = 0
    _upload: threading.Thread | None = field(default=None, repr=False)

    def path(self, cached: str) -> Path:
        """Where a cached path (`.venv`, `~/.npm`) lives in the entry."""
        root, rel = split_path(cached)
        return self.root / root / rel

    def wait_saved(self, timeout: float | None = None) -> None:
        """Wait for adopt's background upload (`wait=False`) to end."""
        if self._upload:
            self._upload.join(timeout)


@dataclass(eq=False)  # one block is not another with the same key
class _Scope:
    """One `use` block: the key, the locks it holds, why it missed."""

    key: str
    fds: list[int] = field(default_factory=list)
    reason: str | None = None


class NodeCache:
    def __init__(self, root: Path, max_bytes: int, remote: DependencyCache):
        self.root, self.max_bytes, self.remote = root, max_bytes, remote
        self._scopes = threading.local()

    # Using an entry.

    @contextlib.contextmanager
    def use(self, key: CacheKey) -> Iterator[Entry | None]:
        """The key's entry, held (never evicted) until the block ends; None on a miss,
        whose reason `miss_reason` tells: "absent", "corrupt" or "unavailable" (S3)."""
        scope = _Scope(key.value)
        stack = self._stack()
        stack.append(scope)
        try:
            with tracing.span("cache restore", **{"faasci.cache.key": key.value[:16]}) as span:
                entry = self._acquire(key, scope)
                tracing.annotate(span, **{"faasci.cache.hit": entry is not None,
                                          "faasci.cache.source": entry and entry.source,
                                          "faasci.cache.miss": scope.reason})  # fmt: skip
            yield entry
        finally:
            stack.remove(scope)
            for fd in scope.fds:
                os.close(fd)

    def miss_reason(self, key: CacheKey) -> str | None:
        """Why the innermost `use` of `key` in this thread missed."""
        scope = self._scope(key)
        return scope.reason if scope else None

    def _acquire(self, key: CacheKey, scope: _Scope) -> Entry | None:
        started = time.monotonic()
        folder = self.folder(key)
        fd = self._hold(folder)
        source = "local"
        if fd is None:
            source = "s3"
            try:
                fd, folder = self._fill(key)
            except NotFound:
                scope.reason = "absent"
            except CorruptArchive as e:
                log.warning("cache %s: %s; treating as a miss", key.archive, e)
                scope.reason = "corrupt"
            except Exception as e:  # S3 away: build without the cache rather than fail
                log.warning("cache %s: S3 unavailable (%s); treating as a miss", key.archive, e)
                scope.reason = "unavailable"
            if fd is None:
                return None
        scope.fds.append(fd)
        size = _read_bytes(folder)
        entry = Entry(key.value, folder, source, size=size, restored_bytes=size,
                      restore_s=round(time.monotonic() - started, 4))  # fmt: skip
        if source == "local":
            self._record_use(key, folder)
        else:
            threading.Thread(target=self.remote.touch, args=(key,), daemon=True).start()
            self.evict()
        return entry

    def _fill(self, key: CacheKey) -> tuple[int, Path]:
        """Unpack the key's archive from S3 into a new entry (absent here)."""
        tmp = self._new_tmp(key)
        try:
            self.remote.download(key, tmp)
            fd, folder, _ = self._install(key, tmp)
            return fd, folder
        finally:
            self._discard(tmp)

    # Adopting what a set-up made.

    def adopt(self, key: CacheKey, sources: dict[str, Path], paths: list[str], *,
              service: str = "", repo: str = "", wait: bool = True) -> Entry:  # fmt: skip
        """Inside `use(key)` after a miss: move each cached path that exists from its
        source folder ({"work": the service folder, "home": HOME}) into a new entry, make
        it this node's entry (held like a hit) and upload its archive to S3 (a failure
        only logs: the local entry stays). With `wait=False` the upload goes on in the
        background (`Entry.wait_saved`). When another stage made the key meanwhile, its
        entry is used (source "local") and what this one made is dropped."""
        scope = self._scope(key)
        if scope is None or scope.reason is None:  # a hit's entry is there already
            raise RuntimeError("adopt() belongs inside `with node.use(key)`, after a miss")
        started = time.monotonic()
        tmp = self._new_tmp(key)
        moved: list[tuple[Path, Path]] = []
        try:
            for path in paths:
                root, rel = split_path(path)
                source, target = sources[root] / rel, tmp / root / rel
                if source.exists() or source.is_symlink():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(source, target)  # a rename on one file system
                    moved.append((target, source))
            fd, folder, ours = self._install(key, tmp)
        except BaseException:
            for target, source in reversed(moved):  # give the stage back what it made
                with contextlib.suppress(OSError):
                    shutil.move(target, source)
            raise
        finally:
            self._discard(tmp)
        scope.fds.append(fd)
        size = _read_bytes(folder)
        entry = Entry(key.value, folder, "setup" if ours else "local", size=size)
        if ours and scope.reason == "unavailable":
            log.warning("cache %s: S3 was unavailable; kept on this node only", key.archive)
        elif ours:  # holding the entry until the upload is done (a lock of its own)
            entry._upload = threading.Thread(  # its span a child of the attempt's
                target=tracing.in_context(self._upload), name=f"cache-upload-{key.value[:12]}",
                args=(key, entry, self._hold(folder), paths, service, repo, started),
            )  # fmt: skip
            entry._upload.start()
            if wait:
                entry.wait_saved()
        self.evict()
        return entry

    @tracing.traced("cache save")
    def _upload(self, key: CacheKey, entry: Entry, fd: int | None, paths: list[str],
                service: str, repo: str, started: float) -> None:  # fmt: skip
        # The lowest CPU priority for this thread (and the tar it starts): the stage's
        # commands, running meanwhile, come first.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            entry.saved_bytes = self.remote.upload(
                key, entry.root, self.root / ".tmp", paths=paths, service=service, repo=repo,
                unpacked_bytes=entry.size,
            )  # fmt: skip
        except Exception as e:  # the stage goes on; another node will make it again
            log.warning("cache %s: upload failed, kept on this node only: %s", key.archive, e)
        finally:
            entry.save_s = round(time.monotonic() - started, 3)
            if fd is not None:
                os.close(fd)

    # Entries on disk.

    def folder(self, key: CacheKey) -> Path:
        return self.root / key.namespace / key.value

    def _new_tmp(self, key: CacheKey) -> Path:
        tmp = self.root / ".tmp" / f"{key.value}-{secrets.token_hex(6)}"
        tmp.mkdir(parents=True)
        return tmp

    def _install(self, key: CacheKey, tmp: Path) -> tuple[int, Path, bool]:
        """Rename a made entry into place, holding it; or hold the one a faster stage put
        there first. (lock fd, the entry's folder, whether it is the one made here)."""
        (tmp / BYTES).write_text(str(_disk_bytes(tmp)))
        (tmp / TOUCHED).touch()
        (tmp / LOCK).touch()
        fd = os.open(tmp / LOCK, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH)  # nobody else knows it yet: the lock is ours at once
        folder = self.folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                os.rename(tmp, folder)
                return fd, folder, True
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    os.close(fd)
                    raise
            winner = self._hold(folder)
            if winner is not None:
                os.close(fd)
                return winner, folder, False
            # the winner's entry was evicted in this very instant: try ours again
        os.close(fd)
        raise OSError(f"cache entry {folder} keeps changing")

    def _hold(self, folder: Path) -> int | None:
        """A shared lock on the entry at `folder`; None when there is none (or it is being
        removed right now)."""
        lock = folder / LOCK
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while an eviction renames it away
        if _inode(lock) == os.fstat(fd).st_ino:
            return fd
        os.close(fd)
        return None

    def _record_use(self, key: CacheKey, folder: Path) -> None:
        """The LRU clock (the lock's mtime), and now and then S3's last_used, in the
        background: a hit costs no S3 call."""
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(folder / LOCK, (now, now))
            touched = folder / TOUCHED
            if now - touched.stat().st_mtime > TOUCH_EVERY_S:
                os.utime(touched, (now, now))
                threading.Thread(target=self.remote.touch, args=(key,), daemon=True).start()

    def _discard(self, folder: Path) -> None:
        """Remove a folder by renaming it into .trash/ first, so nobody sees it half gone."""
        gone = self._to_trash(folder)
        if gone:
            _remove(gone)

    def _to_trash(self, folder: Path) -> Path | None:
        trash = self.root / ".trash"
        trash.mkdir(parents=True, exist_ok=True)
        gone = trash / f"{folder.name}-{secrets.token_hex(6)}"
        try:
            os.rename(folder, gone)
        except FileNotFoundError:
            return None
        return gone

    # Bounded size: least recently used entries go first, never one in use.

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every entry on the node."""
        found = []
        for namespace in _listdir(self.root):
            for folder in _listdir(namespace):
                with contextlib.suppress(OSError, ValueError):
                    found.append(((folder / LOCK).stat().st_mtime, _read_bytes(folder), folder))
        return sorted(found)

    def evict(self) -> list[Path]:
        """Remove least recently used entries that no stage holds until the layer fits in
        max_bytes; the folders removed. Safe against stages and evictions of any process."""
        self._sweep()
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, folder in entries:
            if total <= self.max_bytes:
                break
            if self._remove_unheld(folder):
                total -= size
                removed.append(folder)
        return removed

    def _remove_unheld(self, folder: Path) -> bool:
        lock = folder / LOCK
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a stage uses it
            os.close(fd)
            return False
        try:
            if _inode(lock) != os.fstat(fd).st_ino:
                return False  # removed (and maybe made again) meanwhile
            gone = self._to_trash(folder)  # renamed away while locked: nobody can take it now
        finally:
            os.close(fd)  # before deleting: a stage waiting on the lock learns at once
        if gone:
            _remove(gone)
            log.info("cache entry %s evicted", folder)
        return gone is not None

    def _sweep(self) -> None:
        """What crashed processes left: half-made entries, half-removed ones."""
        now = time.time()
        for tmp in _listdir(self.root / ".tmp", hidden=True):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    self._discard(tmp)
        for gone in _listdir(self.root / ".trash", hidden=True):
            _remove(gone)

    # This thread's `use` blocks.

    def _stack(self) -> list[_Scope]:
        if not hasattr(self._scopes, "stack"):
            self._scopes.stack = []
        return self._scopes.stack

    def _scope(self, key: CacheKey) -> _Scope | None:
        return next((s for s in reversed(self._stack()) if s.key == key.value), None)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _listdir(folder: Path, hidden: bool = False) -> list[Path]:
    """A folder's entries; dot-names only when asked (.tmp and .trash are not namespaces,
    and .lock is not an entry)."""
    try:
        return [p for p in folder.iterdir() if hidden or not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _read_bytes(folder: Path) -> int:
    try:
        return int((folder / BYTES).read_text())
    except (OSError, ValueError):
        return 0


def _disk_bytes(folder: Path) -> int:
    """Bytes on disk of a tree (blocks, not apparent sizes: what the bound is about)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
