"""What a repository without a pipeline file gets: a pipeline that aims at the verdict of
the project's own suite, from what its manifests say (`faasci run --explain` shows it).

Python: its own virtualenv, cached; the test dependencies from where the project keeps them
(dependency groups, extras, requirements files); the checkout re-installed editable in every
stage; `ruff check --no-fix` when ruff is configured; `python -m pytest`. Node: `npm ci` or
`npm install`, then the lint and test scripts it has.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Callable

import yaml
from packaging.utils import canonicalize_name

from .errors import Unprocessable

FILENAME = ".faasci.yml"
Reader = Callable[[str], str | None]  # a file of the service folder at the commit, or None

# Files whose contents key a dependency cache when the pipeline file names none.
DEFAULT_MANIFESTS = {
    "python": ["requirements*.txt", "pyproject.toml", "setup.py", "setup.cfg", "poetry.lock",
               "uv.lock", "Pipfile.lock"],
    "node": ["package.json", "package-lock.json", "npm-shrinkwrap.json", "yarn.lock",
             "pnpm-lock.yaml"],
    "go": ["go.mod", "go.sum"],
    "rust": ["Cargo.toml", "Cargo.lock"],
}  # fmt: skip
PROJECT_MARKERS = {
    "node": {"package.json"},
    "python": {"pyproject.toml", "setup.py", "setup.cfg", "requirements.txt"},
    "go": {"go.mod"},
    "rust": {"Cargo.toml"},
}


def project_type(files: set[str]) -> str | None:
    return next((kind for kind, markers in PROJECT_MARKERS.items() if files & markers), None)


# Timeouts of the default pipeline (seconds): installing dependencies, linting, testing.
SETUP_TIMEOUT, LINT_TIMEOUT, UNIT_TIMEOUT = 1200, 300, 1800
# Where a project keeps its test dependencies (dependency groups and extras): the first
# names found, else `dev`.
TEST_SETS = (("test", "tests"), ("dev",))
REQUIREMENTS = ("requirements.txt", "requirements*dev*.txt", "requirements*test*.txt")
# PEP 517's fallback for a project that names no build system.
LEGACY_BUILD = ["setuptools>=40.8.0", "wheel"]
# What a build backend asks for, besides its `requires`, to build an editable install (its
# get_requires_for_build_editable), which an install with --no-build-isolation never asks.
EDITABLE_REQUIRES = {"hatchling": ["editables"]}
PIP = ".venv/bin/python -m pip install -q --disable-pip-version-check"  # no query of PyPI for pip


def derive(files: set[str], read: Reader) -> tuple[dict, list[str]]:
    """The pipeline (as a pipeline file's data, without `service`) for a repository without
    a pipeline file, from the names at the service folder's top level and the contents of
    its manifests (`read(name)`, None when absent), and why it is what it is."""
    kind = project_type(files)
    if kind not in ("python", "node"):
        raise Unprocessable(
            f"no {FILENAME} and no recognised project (pyproject.toml, setup.py, "
            "requirements.txt or package.json) at the repository root",
            field=FILENAME,
        )
    why: list[str] = []
    manifest, derive = ("package.json", _node) if kind == "node" else ("pyproject.toml", _python)
    try:
        data = derive(files, read, why)
    except (TypeError, AttributeError) as e:  # a list where a table belongs, or the reverse
        raise Unprocessable(f"{manifest}: a value of the wrong type: {e}", field=manifest) from None
    return data, why


def _python(files: set[str], read: Reader, why: list[str]) -> dict:
    markers = ", ".join(sorted(files & PROJECT_MARKERS["python"]))
    why.append(f"Python project ({markers}): its own virtualenv .venv, cached by manifests")
    pyproject = _parsed("pyproject.toml", read, tomllib.loads, tomllib.TOMLDecodeError)
    installable = "setup.py" in files or bool(pyproject.keys() & {"project", "build-system"})
    install: list[str] = []  # the arguments of the set-up's one `pip install`
    named: list[str] = []  # the requirements the project names for its tests

    if installable:
        build = pyproject.get("build-system", {}).get("requires", LEGACY_BUILD)
        build = build + [extra for req in build for extra in EDITABLE_REQUIRES.get(_name(req), [])]
        install += build
        why.append(f"build requirements into .venv ({', '.join(build) or 'none'}): each stage "
                   "installs the checkout with --no-build-isolation")  # fmt: skip
    groups = pyproject.get("dependency-groups", {})
    if chosen := _test_set(groups):
        import dependency_groups  # here: with packaging's parser it costs every start ~20 ms
        from packaging.requirements import InvalidRequirement

        try:
            resolved = list(dependency_groups.resolve(groups, *chosen))
        except (LookupError, ValueError, TypeError, InvalidRequirement) as e:
            raise Unprocessable(
                f"pyproject.toml: dependency-groups: {e}", field="pyproject.toml"
            ) from None
        install += resolved
        named += resolved
        why.append(f"test dependencies: dependency group {', '.join(chosen)} of pyproject.toml")
    extras = pyproject.get("project", {}).get("optional-dependencies", {})
    chosen_extras = _test_set(extras) if installable else []
    if chosen_extras:
        named += [req for extra in chosen_extras for req in extras[extra]]
        why.append(f"test dependencies: extra {', '.join(chosen_extras)} of pyproject.toml")
    for name in sorted(n for n in files if any(fnmatch.fnmatch(n, p) for p in REQUIREMENTS)):
        install += ["-r", name]
        named += _requirement_lines(read(name) or "")
        why.append(f"requirements: {name}")
    if "pytest" not in map(_name, named):
        install.append("pytest")
        why.append("pytest added: no test dependency names it")

    ruff = _ruff_config(files, pyproject)
    if ruff:
        pin = _ruff_pin(read(".pre-commit-config.yaml") or "")
        install.append(f"ruff=={pin}" if pin else "ruff")
        version = f"ruff {pin}, as .pre-commit-config.yaml pins" if pin else "the latest ruff"
        why.append(f"lint: ruff is configured ({ruff}); {version}; --no-fix: it never edits")
    else:
        why.append("no lint stage: ruff is not configured ([tool.ruff], ruff.toml, .ruff.toml)")

    prepare = []
    if installable:
        install += ["-e", "." + (f"[{','.join(chosen_extras)}]" if chosen_extras else "")]
        prepare = [f"{PIP} --no-deps --no-build-isolation -e ."]
        why.append(
            "the set-up installs the project editable (its runtime dependencies); every "
            "stage re-installs the checkout, so the commit's code is what gets tested"
        )
    else:
        why.append("not installable (no setup.py, [project] or [build-system]): tested in place")
    why.append("unit: `python -m pytest` (.venv/bin comes first on PATH)")
    stages = {"unit": {"run": ["python -m pytest"], "timeout": UNIT_TIMEOUT}}
    if ruff:
        stages = {"lint": {"run": ["ruff check --no-fix ."], "timeout": LINT_TIMEOUT}, **stages}
    setup = ["python3 -m venv .venv", f"{PIP} {shlex.join(install)}"]
    cache = {"setup": setup, "paths": [".venv"], "prepare": prepare}
    return {"cache": {**cache, "setup_timeout": SETUP_TIMEOUT}, "stages": stages}


def _node(files: set[str], read: Reader, why: list[str]) -> dict:
    package = _parsed("package.json", read, json.loads, ValueError)
    scripts = package.get("scripts") if isinstance(package.get("scripts"), dict) else {}
    lock = next((n for n in ("package-lock.json", "npm-shrinkwrap.json") if n in files), None)
    setup = "npm ci" if lock else "npm install"
    why.append(f"Node project (package.json): node_modules by `{setup}` "
               f"({f'from {lock}' if lock else 'no lockfile'}), cached by manifests")  # fmt: skip
    stages = {}
    for stage, script, command, timeout in (
        ("lint", "lint", "npm run lint", LINT_TIMEOUT),
        ("unit", "test", "npm test", UNIT_TIMEOUT),
    ):
        body = scripts.get(script)
        if isinstance(body, str) and body.strip() and "no test specified" not in body:
            stages[stage] = {"run": [command], "timeout": timeout}
            why.append(f"{stage}: `{command}` (package.json's {script} script: {body})")
        else:
            why.append(f"no {stage} stage: package.json has no {script} script")
    if not stages:
        raise Unprocessable(
            f"no {FILENAME}, and package.json has neither a lint nor a test script to run",
            field=FILENAME,
        )
    cache = {"setup": [setup], "paths": ["node_modules"], "setup_timeout": SETUP_TIMEOUT}
    return {"cache": cache, "stages": stages}


def _parsed(name: str, read: Reader, parse, error) -> dict:
    text = read(name)
    if text is None:
        return {}
    try:
        data = parse(text)
    except error as e:
        raise Unprocessable(f"{name} cannot be read: {e}", field=name) from None
    except RecursionError:  # nesting without end, from the repository: a 422, not a 500
        raise Unprocessable(f"{name} cannot be read: it nests too deeply", field=name) from None
    if not isinstance(data, dict):
        raise Unprocessable(f"{name} must hold a mapping", field=name)
    return data


def _test_set(table: dict) -> list[str]:
    """The keys of `table` (dependency groups or extras) that hold test dependencies."""
    for names in TEST_SETS:
        if found := [k for k in table if canonicalize_name(k) in names]:
            return found
    return []


def _requirement_lines(text: str) -> list[str]:
    """The requirements of a requirements file (options, includes and paths left out)."""
    lines = (re.sub(r"(^|\s)#.*", "", line).strip().rstrip("\\") for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def _name(requirement: str) -> str | None:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return canonicalize_name(Requirement(requirement).name)
    except InvalidRequirement:
        return None


def _ruff_config(files: set[str], pyproject: dict) -> str | None:
    if "ruff" in pyproject.get("tool", {}):
        return "[tool.ruff] in pyproject.toml"
    return next((name for name in ("ruff.toml", ".ruff.toml") if name in files), None)


def _ruff_pin(text: str) -> str | None:
    """The ruff version .pre-commit-config.yaml's ruff-pre-commit hook pins: its `rev` when that
    is a version tag, else the `# frozen: vX.Y.Z` comment beside a commit `rev`."""
    try:
        repos = (yaml.safe_load(text) or {}).get("repos") or []
    except (yaml.YAMLError, AttributeError, RecursionError):
        return None
    for repo in repos:
        if not isinstance(repo, dict):
            continue
        url = str(repo.get("repo", "")).rstrip("/").removesuffix(".git")
        if not url.endswith("/ruff-pre-commit"):
            continue
        rev = str(repo.get("rev", ""))
        frozen = re.search(rf"rev:\s*['\"]?{re.escape(rev)}['\"]?\s*#\s*frozen:\s*(\S+)", text)
        for candidate in (rev, frozen and frozen.group(1)):
            if candidate and (version := re.fullmatch(r"v?(\d+(?:\.\d+)+)", candidate)):
                return version.group(1)
    return None
