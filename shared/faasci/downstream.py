"""Downstream pipelines: services say what they depend on (`depends_on:` in the pipeline
file, package names as their manifests spell them, or other services' names); when a
dependency moves, the integration stage of every dependent service runs against it.

The service catalog: one entry per service in the NATS KV bucket `faasci-services` (key:
the service name), written at each full run's start: its repository, folder, ref, commit,
`depends_on`, the package it publishes and that package's version (from pyproject.toml,
package.json or go.mod), and the versions its manifests pin. `faasci graph` reads it.

Triggers, both ending in `start_dependents`:
  a) a push whose manifests change the version of the package the service publishes (the
     catalog's version before, the commit's now): its dependents run against name@version;
  b) a full run of a service that passes its promote stage (or passes, without one): its
     dependents run against name@version (the commit when no manifest has a version).
A dependent's run is of its catalogued repository and ref, integration only, with
FAASCI_UPSTREAM=<name>@<version> and trigger `upstream:<name>`. A one-stage run never
triggers more, so a cycle in the graph cannot loop; a service never triggers itself; and
one upstream version starts one run per dependent (claimed once, faasci.once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tomllib
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, Field

log = logging.getLogger("faasci.downstream")

BUCKET = "faasci-services"
CLAIMS_BUCKET = "faasci-downstream"
CLAIM_TTL_S = 90 * 24 * 3600  # one upstream version is never re-run within this
PATIENCE_S = 30
STAGE = "integration"  # what a dependent runs against the moved dependency

# A package as manifests spell it: PyPI (`sample-lib`), npm (`@scope/pkg`), Go module paths
# (`github.com/acme/lib`), or a service name.
DEPENDENCY_RE = r"^@?[A-Za-z0-9][A-Za-z0-9._/~+-]{0,199}$"
Dependency = Annotated[str, Field(min_length=1, max_length=200, pattern=DEPENDENCY_RE)]
DependsOn = Annotated[list[Dependency], Field(max_length=100)]


def normalize(name: str) -> str:
    """A package's name compared as PyPI does (PEP 503): case, `_` and `.` as `-`. npm and
    Go names are lower-case already, and the same rule leaves them one."""
    return re.sub(r"[-_.]+", "-", name).lower()


class Entry(BaseModel):
    """One service in the catalog."""

    service: str
    repo: str
    path: str = ""
    ref: str
    commit: str
    depends_on: list[str] = []
    package: str | None = None  # the package its manifest publishes (pyproject name ...)
    version: str | None = None  # that package's version, when a manifest says it
    pins: dict[str, str] = {}  # the exact versions its manifests pin: {package: version}
    updated_at: str = ""

    @property
    def names(self) -> set[str]:
        """What a dependent may call this service by: its name and its package's."""
        return {normalize(n) for n in (self.service, self.package) if n}


# Manifests: what a commit publishes and pins.

MANIFESTS = ("pyproject.toml", "package.json", "go.mod")
_PIN_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*===?\s*([^\s;,#]+)")
_GO_REQUIRE_RE = re.compile(r"^\s*(?:require\s+)?([^\s()]+\.[^\s()]+/[^\s()]+)\s+(v[^\s/]+)")


def _pins_of(requirements: list[str]) -> dict[str, str]:
    """`name==1.2.3` (or `===`) lines of PEP 508 requirements as {name: version}."""
    found = {}
    for line in requirements:
        m = _PIN_RE.match(line)
        if m:
            found[normalize(m[1])] = m[2]
    return found


def published(files: dict[str, str]) -> tuple[str | None, str | None, dict[str, str]]:
    """(package name, its version, pinned dependencies) from a commit's manifests, given as
    {file name: text}. Unreadable manifests count as saying nothing."""
    name = version = None
    pins: dict[str, str] = {}
    order = {name: at for at, name in enumerate(MANIFESTS)}  # the first that names it wins
    for file, text in sorted(files.items(), key=lambda item: (order.get(item[0], 9), item[0])):
        if text is None:
            continue
        if file.startswith("requirements") and file.endswith(".txt"):
            pins.update(_pins_of(text.splitlines()))
        elif file == "pyproject.toml":
            try:
                data = tomllib.loads(text)
            except (tomllib.TOMLDecodeError, RecursionError):
                continue
            project = data.get("project") if isinstance(data.get("project"), dict) else {}
            tool = data.get("tool") if isinstance(data.get("tool"), dict) else {}
            poetry = tool.get("poetry") if isinstance(tool.get("poetry"), dict) else {}
            name = name or _str(project.get("name")) or _str(poetry.get("name"))
            version = version or _str(project.get("version")) or _str(poetry.get("version"))
            deps = project.get("dependencies")
            if isinstance(deps, list):
                pins.update(_pins_of([d for d in deps if isinstance(d, str)]))
        elif file == "package.json":
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                continue
            if not isinstance(data, dict):
                continue
            name = name or _str(data.get("name"))
            version = version or _str(data.get("version"))
            for key in ("dependencies", "devDependencies", "peerDependencies"):
                deps = data.get(key)
                for dep, spec in deps.items() if isinstance(deps, dict) else ():
                    exact = _str(spec)
                    if exact and re.fullmatch(r"=?v?\d+(\.\d+)*([-+][0-9A-Za-z.-]+)?", exact):
                        pins[normalize(dep)] = exact.lstrip("=v")
        elif file == "go.mod":
            for line in text.splitlines():
                if line.startswith("module "):
                    name = name or line.split()[1]
                elif m := _GO_REQUIRE_RE.match(line):
                    pins[m[1].lower()] = m[2]
    return name, version, pins


def _str(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def bumps(before: Entry | None, after: Entry) -> dict[str, tuple[str | None, str]]:
    """What moved between two catalog states of one service: the package it publishes
    (keyed by its name) and each pin, as {name: (old version, new version)}. A first entry
    (nothing before) moved nothing: there was no version to move from."""
    if before is None:
        return {}
    moved = {}
    if after.package and after.version and before.version != after.version:
        moved[normalize(after.package)] = (before.version, after.version)
    for name, version in after.pins.items():
        if name in before.pins and before.pins[name] != version:
            moved[name] = (before.pins[name], version)
    return moved


def manifest_texts(read, files: set[str]) -> dict[str, str]:
    """The manifests among a service folder's `files`, read with `read(name)`."""
    wanted = [f for f in files if f in MANIFESTS
              or (f.startswith("requirements") and f.endswith(".txt"))]  # fmt: skip
    texts = {}
    for name in wanted:
        try:
            text = read(name)
        except Exception:  # unreadable: says nothing
            text = None
        if text is not None:
            texts[name] = text
    return texts


def entry_for(spec, resolved, repo: str, ref: str) -> Entry:
    """The catalog entry a run of `resolved` (faasci.git.Resolved) with pipeline `spec` makes."""
    package, version, pins = published(manifest_texts(resolved.read, resolved.files))
    return Entry(service=spec.service, repo=repo, path=resolved.path, ref=ref,
                 commit=resolved.commit, depends_on=list(spec.depends_on or []),
                 package=package, version=version, pins=pins,
                 updated_at=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip


# The graph.


def dependents(catalog: dict[str, Entry], upstream: Entry) -> list[Entry]:
    """The services that depend on `upstream` (by its service or package name), never
    itself."""
    names = upstream.names
    return sorted((e for e in catalog.values() if e.service != upstream.service
                   and names & {normalize(d) for d in e.depends_on}),
                  key=lambda e: e.service)  # fmt: skip


def edges(catalog: dict[str, Entry]) -> dict[str, list[str]]:
    """service -> the services of the catalog it depends on (names not in the catalog, such
    as third-party packages, are left out here; graph() lists them)."""
    by_name = {}
    for e in catalog.values():
        for n in e.names:
            by_name.setdefault(n, e.service)
    return {s: sorted({by_name[normalize(d)] for d in e.depends_on
                       if normalize(d) in by_name and by_name[normalize(d)] != s})
            for s, e in sorted(catalog.items())}  # fmt: skip


def cycles(catalog: dict[str, Entry]) -> list[list[str]]:
    """Each cycle of the graph once, as the services on it (smallest name first)."""
    graph = edges(catalog)
    found: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, ()):
            if nxt == path[0]:
                at = path.index(min(path))
                found.add(tuple(path[at:] + path[:at]))
            elif nxt not in path and nxt > path[0]:  # each cycle from its smallest member
                walk(nxt, [*path, nxt])

    for start in graph:
        walk(start, [start])
    return [list(c) for c in sorted(found)]


def graph(catalog: dict[str, Entry]) -> dict:
    """What `faasci graph` prints: per service, what it depends on (services and packages)
    and its dependents, and the graph's cycles."""
    services = {}
    for name, e in sorted(catalog.items()):
        services[name] = {
            "repo": e.repo, "path": e.path, "ref": e.ref, "commit": e.commit,
            "package": e.package, "version": e.version, "depends_on": e.depends_on,
            "dependents": [d.service for d in dependents(catalog, e)],
            "updated_at": e.updated_at,
        }  # fmt: skip
    return {"services": services, "cycles": cycles(catalog)}


# The catalog in NATS KV.


def catalog() -> dict[str, Entry]:
    from . import services

    async def _all() -> dict[str, Entry]:
        kv = await services.bus().bucket(BUCKET)
        nc = await services.bus().nc()
        # The stream's subjects list the keys (kv.keys() may end before its first entry).
        answer = await nc.request(f"$JS.API.STREAM.INFO.KV_{BUCKET}",
                                  json.dumps({"subjects_filter": f"$KV.{BUCKET}.>"}).encode(),
                                  timeout=5)  # fmt: skip
        subjects = (json.loads(answer.data).get("state") or {}).get("subjects") or {}
        found = {}
        for subject in subjects:
            key = subject.removeprefix(f"$KV.{BUCKET}.")
            try:
                entry = await kv.get(key)
            except Exception:  # deleted meanwhile
                continue
            if entry.value:
                found[key] = Entry.model_validate_json(entry.value)
        return found

    return services.bus().call(_all, patience=PATIENCE_S)


def get(service: str) -> Entry | None:
    from nats.js.errors import KeyNotFoundError

    from . import services

    async def _get() -> Entry | None:
        kv = await services.bus().bucket(BUCKET)
        try:
            entry = await kv.get(service)
        except KeyNotFoundError:
            return None
        return Entry.model_validate_json(entry.value) if entry.value else None

    return services.bus().call(_get, patience=PATIENCE_S)


def put(entry: Entry) -> None:
    from . import services

    async def _put() -> None:
        kv = await services.bus().bucket(BUCKET)
        await kv.put(entry.service, entry.model_dump_json().encode())

    services.bus().call(_put, patience=PATIENCE_S)


# Triggers.


def on_run_start(run, entry: Entry) -> list[str]:
    """Record a full run's service in the catalog; on a push that moved the version of the
    package it publishes, start its dependents (trigger a). Never raises: a catalog that
    cannot be written costs the graph an update, not the run."""
    try:
        before = get(entry.service)
        put(entry)
        moved = bumps(before, entry)
        own = normalize(entry.package) if entry.package else None
        if run.trigger != "push" or own not in moved:
            return []
        return start_dependents(entry, entry.version or run.commit)
    except Exception as e:
        log.warning("run %s: the service catalog was not updated: %s", run.id, e)
        return []


def released(run) -> bool:
    """Did this full run just release its service: promote passed (or, without a promote
    stage, the whole run passed)?"""
    if [s.name for s in run.stages] != run.pipeline.stage_names():
        return False  # a one-stage run (a dependent's, an invocation) releases nothing
    if "promote" in run.pipeline.stages:
        return run.stage("promote").status == "passed"
    return run.status == "passed"


def after_stage(run, stage: str) -> list[str]:
    """After a stage's result is recorded: when it released the service (trigger b), start
    its dependents against the released version. Never raises."""
    try:
        if not (stage == "promote" or run.finished) or not released(run):
            return []
        if stage != "promote" and "promote" in run.pipeline.stages:
            return []  # released at promote already
        entry = get(run.service)
        if entry is None or entry.commit != run.commit:  # the catalog moved on: say the commit
            version = run.commit[:12]
            entry = entry or Entry(service=run.service, repo=run.repo, ref=run.ref,
                                   commit=run.commit)  # fmt: skip
        else:
            version = entry.version or run.commit[:12]
        return start_dependents(entry, version)
    except Exception as e:
        log.warning("run %s: starting dependent runs failed: %s", run.id, e)
        return []


def claim_key(dependent: str, upstream: str, version: str) -> str:
    return hashlib.sha256(f"{dependent}\0{upstream}\0{version}".encode()).hexdigest()[:48]


def start_dependents(upstream: Entry, version: str) -> list[str]:
    """Start the integration stage of every dependent of `upstream` against name@version,
    once per dependent and version. The ids of the runs started."""
    from . import once
    from .trigger import start_run

    name = upstream.package or upstream.service
    started = []
    for dep in dependents(catalog(), upstream):
        key = claim_key(dep.service, normalize(name), version)
        if not once.claim(CLAIMS_BUCKET, key, CLAIM_TTL_S):
            log.info("%s@%s: %s already ran against it", name, version, dep.service)
            continue
        try:
            run = start_run(dep.repo, dep.ref, trigger=f"upstream:{name}", only=STAGE,
                            env={"FAASCI_UPSTREAM": f"{name}@{version}"})  # fmt: skip
        except Exception as e:  # no integration stage, repository gone: the others still run
            once.release(CLAIMS_BUCKET, key, CLAIM_TTL_S)
            log.warning("%s@%s: no run of dependent %s: %s", name, version, dep.service, e)
            continue
        log.info("%s@%s: dependent %s runs %s (run %s)", name, version, dep.service, STAGE, run.id)
        started.append(run.id)
    return started


def render(answer: dict) -> str:
    """The graph as text: each service, what it depends on, and what depends on it."""
    lines = []
    for name, s in answer["services"].items():
        version = f" {s['version']}" if s.get("version") else ""
        lines.append(f"{name}{version}")
        for d in s["depends_on"]:
            lines.append(f"  -> {d}")
        for d in s["dependents"]:
            lines.append(f"  <- {d}")
    for cycle in answer.get("cycles") or []:
        lines.append("cycle: " + " -> ".join([*cycle, cycle[0]]))
    return "\n".join(lines) if lines else "no services in the catalog yet (run a pipeline)"
