"""Stage logs stored in S3, served by the pipeline-log function to viewers, and to anyone
holding the attempt's link (a Slack alert's "Full log" opens without a token).

While an attempt runs, LiveLog tails the file its commands write: every FLUSH_S it masks
what is new and uploads it as a part object `<log key>.parts/<offset>` (the offset in the
masked log, zero-padded, so the keys sort). Past the cap (FAASCI_LOG_MAX_BYTES, default
100 MB) only the head (half the cap) and a sliding tail (the other half) are kept: tail
parts that slide out are deleted, and output that would only slide out is never read. When
the attempt ends the final object `<log key>` is put (head, a "[faas-ci] ... N bytes cut"
line, tail) and the parts are deleted; a lost attempt's parts stay, and are its log.

Serving streams: the final object when there is one, else the parts (a gap between two is
the cut); `?follow=1` waits for more parts until the final object appears (and continues in
it where the parts left off) or the attempt is no longer running. Nothing is held whole in
memory, neither here nor by the gateway.

A link carries `?sig=<expiry>.<random>`, and the run record keeps the link it was given:
the log opens when the two match and the expiry has not passed. Nothing to verify it
with rotates away (a key-signed link would die with the signing key's overlap window).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import STAGES
from .api import Route, run_id_field
from .errors import NotFound, UserError
from .services import objects, run_store
from .settings import settings

log = logging.getLogger("faasci.logs")

FUNCTION = "pipeline-log"
LINK_TTL_S = 7 * 24 * 3600
MAX_BYTES = 100 * 2**20  # the default cap of one attempt's log (FAASCI_LOG_MAX_BYTES)
FLUSH_S = 2.0  # how often a running attempt's new output is uploaded
PART_MAX = 4 * 2**20  # the largest part object (and the most held in memory to mask it)
FOLLOW_POLL_S = 1.0  # how often a follower looks for new parts
TAIL_CHARS = 4000  # the end of the log kept for the run record's error tail


def log_key(run_id: str, stage: str, attempt: int) -> str:
    return f"logs/{run_id}/{stage}/{attempt}.log"


def part_prefix(key: str) -> str:
    return f"{key}.parts/"


def part_key(key: str, offset: int) -> str:
    return f"{part_prefix(key)}{offset:015d}"


def max_bytes(env=os.environ) -> int:
    """FAASCI_LOG_MAX_BYTES: bytes, or with a K, M or G suffix (binary); at least 64 KiB."""
    raw = (env.get("FAASCI_LOG_MAX_BYTES") or "").strip().upper().removesuffix("B")
    m = re.fullmatch(r"(\d+)\s*([KMG]?)I?", raw)
    if not m:
        if raw:
            log.warning("FAASCI_LOG_MAX_BYTES=%r is not a size; using %d", raw, MAX_BYTES)
        return MAX_BYTES
    return max(int(m[1]) * 1024 ** " KMG".index(m[2] or " "), 64 * 1024)


def cut_line(cut: int, cap: int) -> bytes:
    return (f"\n[faas-ci] … {cut} bytes cut: the log is over its cap of {cap} bytes "
            f"(FAASCI_LOG_MAX_BYTES); its head and tail are kept …\n").encode()  # fmt: skip


class LiveLog:
    """Streams the log file `path` (written by an attempt's commands) to S3 under `key`
    while it grows, masked by `masker`, capped at `cap` bytes: see the module's doc.

    with live: ...the commands run...   (a thread uploads every FLUSH_S)
    final = live.finish()                (a local file: the capped, masked log to store)
    ...put `final` at `key` with live.metadata()...; discard_parts(key) if live.sent_parts

    Uploading parts is best effort: while S3 refuses, parts wait on the local disk (the
    tail's are bounded by the cap), and the attempt goes on."""

    def __init__(self, path: Path, key: str, masker=None, cap: int | None = None,
                 store=None, flush_s: float = FLUSH_S):  # fmt: skip
        self.path, self.key, self.masker = path, key, masker
        self.cap = cap or max_bytes()
        self.head_max = self.cap // 2
        self.tail_max = self.cap - self.head_max
        self._store, self.flush_s = store, flush_s
        self.parts_dir = path.with_name(path.name + ".parts")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.read_at = 0  # raw bytes of the file consumed
        self.pos = 0  # bytes of the (masked, uncut) log so far: the next part's offset
        self.carry = b""  # raw bytes the masker cannot decide yet
        self.parts: dict[int, int] = {}  # offset -> size, of the parts held locally
        self.uploaded: set[int] = set()
        self.to_delete: list[int] = []  # uploaded parts that slid out of the tail
        self.tail = ""  # the last TAIL_CHARS of the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._meta: dict[str, str] = {}
        self.sent_parts = False  # an upload of a part was tried: there may be parts to discard

    @property
    def store(self):
        if self._store is None:
            self._store = objects()
        return self._store

    def __enter__(self) -> LiveLog:
        self._thread = threading.Thread(target=self._run, name=f"log-{self.key}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                with self._lock:
                    self._pump()
                    self._upload()
            except Exception as e:  # never the attempt's failure: the next round retries
                log.warning("streaming the log %s: %s", self.key, e)

    def _mask(self, raw: bytes) -> bytes:
        if not self.masker:
            return raw
        done, self.carry = self.masker._prefix(self.carry + raw)
        # No form to mask holds a line break (a multi-line value's lines are forms of their
        # own): whole lines need not wait for more output, so a follower sees them now.
        end = self.carry.rfind(b"\n") + 1
        if end:
            done += self.masker.bytes(self.carry[:end])
            self.carry = self.carry[end:]
        return done

    def _pump(self, final: bool = False) -> None:
        """Read what the file gained, mask it, keep it as local parts (head, sliding tail)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        with open(self.path, "rb") if size else contextlib.nullcontext() as f:
            while self.read_at < size:
                if self.pos >= self.head_max and size - self.read_at > self.tail_max + PART_MAX:
                    self._skip(f, size - self.tail_max)
                    continue
                f.seek(self.read_at)
                raw = f.read(min(PART_MAX, size - self.read_at))
                if not raw:
                    break
                self.read_at += len(raw)
                self._emit(self._mask(raw))
        if final and self.carry:
            self._emit(self.masker.bytes(self.carry))
            self.carry = b""
        self._slide()

    def _skip(self, f, target: int) -> None:
        """Past the head, with more unread than the tail keeps: what would only slide out
        is cut unread, up to a line's start near `target`."""
        f.seek(target)
        newline = f.read(64 * 1024).find(b"\n")
        target += newline + 1 if newline >= 0 else 0
        if self.carry:
            self._emit(self.masker.bytes(self.carry))
            self.carry = b""
        self.pos += target - self.read_at
        self.read_at = target

    def _emit(self, data: bytes) -> None:
        while data:
            n = len(data)
            if self.pos < self.head_max:  # the head ends at a part's end
                n = min(n, self.head_max - self.pos)
            (self.parts_dir / f"{self.pos:015d}").write_bytes(data[:n])
            self.parts[self.pos] = n
            self.pos += n
            self.tail = (self.tail + data[:n][-TAIL_CHARS:].decode(errors="replace"))[-TAIL_CHARS:]
            data = data[n:]

    def _slide(self) -> None:
        """Drop the tail parts that are wholly before the last tail_max bytes."""
        for offset, size in sorted(self.parts.items()):
            if offset >= self.head_max and offset + size <= self.pos - self.tail_max:
                del self.parts[offset]
                (self.parts_dir / f"{offset:015d}").unlink(missing_ok=True)
                if offset in self.uploaded:
                    self.uploaded.discard(offset)
                    self.to_delete.append(offset)

    def _upload(self) -> None:
        try:
            for offset in sorted(set(self.parts) - self.uploaded):
                self.sent_parts = True
                self.store.put_file(part_key(self.key, offset), self.parts_dir / f"{offset:015d}")
                self.uploaded.add(offset)
            while self.to_delete:
                self.store.delete(part_key(self.key, self.to_delete[0]))
                self.to_delete.pop(0)
        except Exception as e:
            if not self._warned:
                log.warning("uploading the live log %s failed (%s); retrying", self.key, e)
                self._warned = True
            return
        self._warned = False

    def finish(self) -> Path:
        """Stop streaming; the whole capped, masked log as a local file beside the log."""
        self.__exit__()
        with self._lock:
            self._pump(final=True)
            final = self.path.with_name(self.path.name + ".final")
            offsets = sorted(self.parts)
            meta = {"logical-size": self.pos, "head": 0, "tail-from": self.pos, "tail-at": 0}
            with final.open("wb") as out:
                for chunk in join_parts(
                    [(o, self.parts[o]) for o in offsets],
                    lambda o, skip: _read_file(self.parts_dir / f"{o:015d}", skip),
                    self.head_max, self.tail_max, self.cap, meta,
                ):  # fmt: skip
                    out.write(chunk)
            self._meta = {k: str(v) for k, v in meta.items()}
        return final

    def metadata(self) -> dict[str, str]:
        """The final object's metadata: where its head ends and its tail starts, so a
        follower that read parts goes on at the right place."""
        return dict(self._meta)


def discard_parts(key: str, store=None) -> None:
    """The final object `key` is stored: delete its live parts (best effort; a follower
    that misses one goes on in the final object)."""
    try:
        store = store or objects()
        for part in store.keys(part_prefix(key)):
            store.delete(part)
    except Exception as e:
        log.warning("deleting the live parts of %s failed: %s", key, e)


def _read_file(path: Path, skip: int = 0, chunk: int = 1 << 16) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(skip)
        while block := f.read(chunk):
            yield block


def join_parts(parts: list[tuple[int, int]], read: Callable[[int, int], Iterator[bytes]],
               head_max: int, tail_max: int, cap: int,
               meta: dict | None = None) -> Iterator[bytes]:  # fmt: skip
    """The log of the parts [(offset, size)], in order: the head, a cut line for a gap, and
    of the parts after head_max only the last tail_max bytes. `read(offset, skip)` gives a
    part's bytes from `skip` on. `meta` receives where the head ends in the output
    ("head"), and where its tail starts, in the log ("tail-from") and the output ("tail-at")."""
    parts = sorted(parts)
    end = parts[-1][0] + parts[-1][1] if parts else 0
    tail_from = max(end - tail_max, head_max)
    at = written = 0  # the log's offset reached; bytes output
    head_done = False
    for offset, size in parts:
        if offset >= head_max and offset + size <= tail_from:
            continue
        skip = max(tail_from - offset, 0) if offset >= head_max else 0
        start = offset + skip
        if start > at:  # a gap: the cut
            if meta is not None and not head_done:
                meta["head"], head_done = written, True
            line = cut_line(start - at, cap)
            yield line
            written += len(line)
            if meta is not None:
                meta["tail-from"], meta["tail-at"] = start, written
        for block in read(offset, skip):
            yield block
            written += len(block)
        at = offset + size
    if meta is not None:
        if not head_done:
            meta["head"] = written
            meta["tail-from"], meta["tail-at"] = at, written
        meta["logical-size"] = at


def log_link(run_id: str, stage: str, attempt: int) -> str:
    """The URL of an attempt's log: it opens without a token for LINK_TTL_S once the run
    record holds it."""
    sig = f"{int(time.time() + LINK_TTL_S)}.{secrets.token_urlsafe(24)}"
    return f"{settings().public_url}/function/{FUNCTION}/{run_id}/{stage}/{attempt}?sig={sig}"


def link_opens(event, run_id: str, stage: str, attempt: str) -> bool:
    """Is the request's ?sig= the unexpired one of this attempt's recorded link?"""
    sig = event.query.get("sig", "")
    expiry = sig.partition(".")[0]
    if not expiry.isdigit() or int(expiry) < time.time() or not attempt.isdigit():
        return False
    try:
        found = run_store().get(run_id_field(run_id)).stage(stage).attempts
    except (UserError, KeyError, ValueError):  # no such run or stage: not a link of ours
        return False
    recorded = [a.log for a in found if a.number == int(attempt) and a.log]
    given = parse_qs(urlsplit(recorded[0]).query).get("sig", [""])[0] if recorded else ""
    return bool(given) and hmac.compare_digest(given.encode(), sig.encode())


def serve(event, principal, run_id: str, stage: str, attempt: str | None = None) -> dict:
    """GET /<run id>/<stage>[/<attempt>][?follow=1]: the log as plain text (the last attempt
    by default), streamed; while the attempt runs, what it wrote so far (following: until it
    ends)."""
    run_id = run_id_field(run_id)
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}", field="stage")
    if attempt is not None:
        if not attempt.isdigit():
            raise UserError("attempt must be a positive whole number", field="attempt")
        number = int(attempt)
    else:
        attempts = run_store().get(run_id).stage(stage).attempts
        if not attempts:
            raise NotFound(f"stage {stage} of run {run_id} has not run", field="stage")
        number = attempts[-1].number
    key, store = log_key(run_id, stage, number), objects()
    follow = event.query.get("follow", "") not in ("", "0", "false", "no")
    final = store.head(key)
    if final is not None:
        body = store.stream(key)
    elif follow and _running(run_id, stage, number) is not False:
        body = follow_log(store, key, lambda: _running(run_id, stage, number))
    else:
        parts = _parts(store, key)
        if not parts:
            raise NotFound(f"no log of {stage} attempt {number} of run {run_id}", field="stage")
        cap = max_bytes()
        body = join_parts(parts, lambda o, skip: store.stream(part_key(key, o), skip),
                          cap // 2, cap - cap // 2, cap)  # fmt: skip
    return {
        "statusCode": 200,
        "body": _guarded(body, key),
        "headers": {"Content-Type": "text/plain; charset=utf-8", "X-Accel-Buffering": "no"},
    }


def _guarded(body: Iterator[bytes], key: str) -> Iterator[bytes]:
    """The body, ending with a line that says so if reading it fails halfway (the status
    line has gone out already)."""
    try:
        yield from body
    except Exception as e:
        log.error("serving the log %s failed: %s", key, e)
        yield f"\n[faas-ci] (the log could not be read to its end: {type(e).__name__})\n".encode()


def _parts(store, key: str) -> list[tuple[int, int]]:
    prefix = part_prefix(key)
    return [(int(k[len(prefix):]), size) for k, size in store.sizes(prefix)
            if k[len(prefix):].isdigit()]  # fmt: skip


def _running(run_id: str, stage: str, number: int) -> bool | None:
    """Is the attempt running (or about to)? None when that cannot be told now."""
    try:
        found = run_store().get(run_id).stage(stage).attempts
    except NotFound:
        return False
    except Exception as e:  # NATS restarting: go on following
        log.warning("following %s/%s/%d: %s", run_id, stage, number, e)
        return None
    if len(found) < number:
        return True  # dispatched, not claimed yet
    return found[number - 1].status == "running"


def final_offset(meta: dict, at: int) -> int:
    """Where a follower that read the parts up to `at` goes on in the final object."""
    try:
        head, tail_from, tail_at = (int(meta[k]) for k in ("head", "tail-from", "tail-at"))
    except (KeyError, ValueError):
        return at
    if at <= head:
        return at
    return tail_at + (at - tail_from) if at >= tail_from else head


def follow_log(store, key: str, running: Callable[[], bool | None],
               poll_s: float = FOLLOW_POLL_S) -> Iterator[bytes]:  # fmt: skip
    """The parts as they come, then the rest of the final object once it is stored; ends
    when the attempt is no longer running and nothing more comes."""
    at, quiet_since = 0, time.monotonic()
    cap = max_bytes()
    while True:
        final = store.head(key)
        if final is not None:
            yield from store.stream(key, final_offset(final["metadata"], at))
            return
        progressed = False
        for offset, size in _parts(store, key):
            if offset + size <= at:
                continue
            if offset > at:
                yield cut_line(offset - at, cap)
                at = offset
            try:
                for block in store.stream(part_key(key, offset), at - offset):
                    yield block
                    at += len(block)
            except NotFound:  # slid out of the tail, or the final object replaced it
                break
            progressed = True
        if progressed:
            quiet_since = time.monotonic()
            continue
        if time.monotonic() - quiet_since > 2 * FLUSH_S + poll_s and running() is False:
            if store.head(key) is None:  # one last look for the final object
                yield b"\n[faas-ci] the attempt ended without a final log: this is what it wrote\n"
                return
            continue
        time.sleep(poll_s)


ROUTES = [
    Route("GET", "/<run_id>/<stage>", "viewer", serve),
    Route("GET", "/<run_id>/<stage>/<attempt>", "viewer", serve, link=link_opens),
]
