"""Masking secret values wherever faas-ci writes text: stage logs, run records, errors, and
the function process's own log.

A Masker replaces each secret value with MASK, in the forms a command is likely to print:

- the value itself, and each of its lines (a multi-line key printed line by line);
- base64, standard and URL-safe, with or without padding, alone or embedded in longer
  encoded text at any of the three byte alignments (`echo "$S" | base64`, a basic-auth
  header, a JSON blob that holds it): the characters that depend only on the value;
- URL-encoded (`quote`, `quote_plus`, lower-case escapes too).

A value shorter than MIN_CHARS cannot be masked without masking ordinary text (and its
base64 fragments would be a handful of characters): `Masker.strict` refuses it.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_CHARS = 4  # shorter values are refused, not masked
MIN_FORM_CHARS = 4  # an encoded fragment shorter than this is left alone
CHUNK = 1 << 20


class Unmaskable(ValueError):
    """A secret value too short to be masked safely."""


def _b64_forms(raw: bytes) -> set[bytes]:
    """The base64 text (standard and URL-safe) that depends only on `raw`, whole and at
    each alignment inside longer data."""
    forms: set[bytes] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(raw)
        forms |= {whole, whole.rstrip(b"=")}
        for k in range(3):  # k bytes of something else before the value
            text = encode(b"\0" * k + raw)
            skip = -(-k * 8 // 6)  # characters that hold bits of the bytes before
            determined = (8 * (k + len(raw))) // 6  # characters fully set by known bytes
            forms.add(text[skip:determined])
    return {f for f in forms if len(f) >= MIN_FORM_CHARS}


def forms(value: str) -> set[bytes]:
    """Every form of `value` to mask, as bytes."""
    found: set[bytes] = set()
    parts = [value] + [line for line in value.splitlines() if line.strip() != value.strip()]
    for part in parts:
        part = part.strip("\r")
        if len(part.strip()) < MIN_CHARS:
            continue
        raw = part.encode()
        found.add(raw)
        found |= _b64_forms(raw)
        for text in (quote(part, safe=""), quote(part), quote_plus(part)):
            found.add(text.encode())
            found.add(re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), text).encode())
    return {f for f in found if len(f) >= MIN_FORM_CHARS}


class Masker:
    """Replaces every form of a set of secret values with MASK, in bytes and in text."""

    def __init__(self, values: Iterable[str] = ()):
        self.values: list[str] = []
        self._forms: set[bytes] = set()
        self._re: re.Pattern[bytes] | None = None
        self.longest = 0
        self.add(values)

    @classmethod
    def strict(cls, values: dict[str, str]) -> Masker:
        """A masker of {name: value}; Unmaskable names a value too short to mask."""
        for name, value in values.items():
            if len(value.strip()) < MIN_CHARS:
                raise Unmaskable(
                    f"secret {name} is shorter than {MIN_CHARS} characters: too short to be "
                    "masked in logs, so it is refused"
                )
        return cls(values.values())

    def add(self, values: Iterable[str]) -> Masker:
        known = len(self.values)
        for value in values:
            if value and value not in self.values:
                self.values.append(value)
                self._forms |= forms(value)
        if len(self.values) == known and self._re is not None:
            return self  # nothing new: the pattern stands
        ordered = sorted(self._forms, key=len, reverse=True)  # the longest form wins
        self._re = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None
        self.longest = len(ordered[0]) if ordered else 0
        return self

    def copy(self) -> Masker:
        """The same masker, without making its forms and pattern again."""
        other = Masker()
        other.values, other._forms = list(self.values), set(self._forms)
        other._re, other.longest = self._re, self.longest
        return other

    def __bool__(self) -> bool:
        return self._re is not None

    def bytes(self, data: bytes) -> bytes:
        return self._re.sub(MASK.encode(), data) if self._re else data

    def text(self, text: str | None) -> str | None:
        if not text or not self._re:
            return text
        return self.bytes(text.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape"
        )

    def json(self, value):
        """Every string inside a JSON-like value (dicts, lists) masked."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.json(v) for v in value]
        return value

    def file(self, path: Path) -> None:
        """Mask a file in place, streaming (a log of any size), matches across chunks too."""
        if not self._re:
            return
        tmp = path.with_name(path.name + ".masking")
        with path.open("rb") as src, tmp.open("wb") as dst:
            carry = b""
            while chunk := src.read(CHUNK):
                done, carry = self._prefix(carry + chunk)
                dst.write(done)
            dst.write(self.bytes(carry))
        tmp.replace(path)

    def _prefix(self, buf: bytes) -> tuple[bytes, bytes]:
        """Mask what can be decided in `buf` now: (masked output, the tail to carry on).
        A match starting before `safe` is whole inside buf, as no form is longer."""
        safe, out, at = max(len(buf) - self.longest + 1, 0), [], 0
        for m in self._re.finditer(buf):
            if m.start() >= safe:
                break
            out += [buf[at : m.start()], MASK.encode()]
            at = m.end()
        cut = max(at, safe)
        out.append(buf[at:cut])
        return b"".join(out), buf[cut:]


# The function process's own log: the platform's secrets and those of running stages.

_active: dict[int, Masker] = {}
_active_lock = threading.Lock()


def register(masker: Masker) -> int:
    """Mask `masker`'s values in this process's log records until `unregister`."""
    with _active_lock:
        _active[id(masker)] = masker
    return id(masker)


def unregister(handle: int) -> None:
    with _active_lock:
        _active.pop(handle, None)


_platform: tuple[float, tuple, tuple[str, ...], Masker] | None = None
PLATFORM_REFRESH_S = 5.0  # a secret file rewritten in place is masked within this


def _platform_masker() -> Masker:
    """The platform's secrets this process holds: Vault values it has read and the secret
    files. Remade only when they may have changed (Vault gave a new value, the folder or
    its listing changed, PLATFORM_REFRESH_S passed): a masker's forms and pattern cost
    more than most stages' own work."""
    global _platform
    from . import vault
    from .settings import settings

    known = vault.known_platform_values()
    folder = settings().secrets_dir
    try:
        stamp = (folder, folder.stat().st_mtime_ns)  # a file added, removed or renamed in
    except OSError:
        stamp = (folder, None)
    if _platform:
        made, was, values, masker = _platform
        if (was == stamp and time.monotonic() - made < PLATFORM_REFRESH_S
                and set(known) <= set(values)):  # fmt: skip
            return masker
    values = list(known)
    try:
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.is_file() and path.stat().st_size < 65536:
                value = path.read_text(errors="replace").strip()
                if len(value) >= 8:  # a generated secret, not "admin"
                    values.append(value)
    except OSError:
        pass
    same = _platform and set(values) == set(_platform[2])
    masker = _platform[3] if same else Masker(values)
    _platform = (time.monotonic(), stamp, tuple(values), masker)
    return masker


def _running_values() -> list[str]:
    with _active_lock:
        return [v for masker in _active.values() for v in masker.values]


def process_masker() -> Masker:
    """The platform's secrets this process holds and the secrets of stages running now:
    a masker of its own (the caller may add to it)."""
    return _platform_masker().copy().add(_running_values())


class SecretsFilter(logging.Filter):
    """Masks secret values in every record passing through (message and arguments
    rendered, exception text too). Add it to the handlers of the function's process."""

    def __init__(self):
        super().__init__()
        self._masker: Masker | None = None
        self._key: tuple = ()

    def _current(self) -> Masker:
        """process_masker(), made again only when the platform's masker was (it knows when
        its secrets may have changed) or another stage's secrets came or went."""
        _platform_masker()
        made, _, _, platform = _platform  # as made then, even if another thread remakes it
        with _active_lock:
            key = (made, tuple(_active))
        if self._masker is None or key != self._key:
            self._masker, self._key = platform.copy().add(_running_values()), key
        return self._masker

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            masker = self._current()
        except Exception:  # never lose a log line to masking trouble
            return True
        if not masker:
            return True
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        masked = masker.text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_text:
            record.exc_text = masker.text(record.exc_text)
        return True


def install_filter(logger: logging.Logger | None = None) -> SecretsFilter:
    """Put a SecretsFilter on every handler of `logger` (the root logger by default)."""
    logger = logger or logging.getLogger()
    flt = SecretsFilter()
    for handler in logger.handlers:
        if not any(isinstance(f, SecretsFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
