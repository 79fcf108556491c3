"""The projects of ../shared/corpus, run through faas-ci, give their own verdict.

The truth comes first: each project's suite run directly in a fresh environment (a new
virtualenv with the project editable and its own `tests` dependency group; `npm install`),
once per module. Then each project runs on the local stack three ways, all at once: as
shipped (no pipeline file: the default), with a pipeline file equivalent to the default, and
with one test broken. The first two must give the truth's verdicts and counts; the third
must fail at `unit` with the broken test's name in `faasci logs`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dependency_groups
import pytest
from conftest import CORPUS_PROJECTS, FAASCI, commit_all, corpus_repo, git, wait_for_run

pytestmark = pytest.mark.timeout(1800)

RUN_TIMEOUT = 1200

# A pipeline file saying what the default says, in a person's words.
PYTHON_FILE = """\
cache:
  setup:
    - python3 -m venv .venv
    - .venv/bin/python -m pip install -q {install} -e .
  paths: [.venv]
  prepare: [.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .]
stages:
  lint: {{run: ruff check --no-fix ., timeout: 300}}
  unit: {{run: python -m pytest, timeout: 1800}}
"""
PIPELINE_FILES = {
    "blinker": PYTHON_FILE.format(install="flit_core pytest pytest-asyncio ruff==0.11.12"),
    "markupsafe": PYTHON_FILE.format(install="'setuptools>=77' pytest ruff==0.11.11"),
    "structlog": PYTHON_FILE.format(
        install="hatchling hatch-vcs hatch-fancy-pypi-readme editables pytest pytest-asyncio "
        "pytest-randomly simplejson time-machine ruff==0.15.16"
    ),
    "mime-types": """\
cache: {setup: npm install, paths: [node_modules]}
stages:
  lint: {run: npm run lint, timeout: 300}
  unit: {run: npm test, timeout: 1800}
""",
}

# One assertion made false per project: (file, text, broken text, the test's name in the log).
BREAKS = {
    "blinker": ("tests/test_symbol.py", 'repr(foo) == "foo"', 'repr(foo) == "bar"',
                "test_symbols"),
    "markupsafe": ("tests/test_markupsafe.py", "unsafe + safe == str(", "unsafe + safe != str(",
                   "test_adding"),
    "structlog": ("tests/test_utils.py", "get_processname() == multiprocessing",
                  "get_processname() != multiprocessing", "TestGetProcessname::test_default"),
    "mime-types": ("test/test.js", "charset('TEXT/HTML'), 'UTF-8'",
                   "charset('TEXT/HTML'), 'UTF-16'", 'should return "UTF-8" for "TEXT/HTML"'),
}  # fmt: skip


@dataclass
class Verdict:
    """What one way of running a project's suite said."""

    lint_passed: bool
    unit_passed: bool
    counts: dict[str, int]  # passed, failed, skipped ... (pytest) or passing, failing (mocha)
    install_s: float = 0.0
    test_s: float = 0.0


def counts_of(output: str) -> dict[str, int]:
    """The counts of the last pytest summary line, or of mocha's closing lines."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    summaries = [line for line in text.splitlines()
                 if re.search(r"\d+ (passed|failed|errors?)\b.* in [\d.]+s", line)]  # fmt: skip
    if summaries:
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summaries[-1])
        return {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                for n, kind in found}  # fmt: skip
    return {kind: int(n) for n, kind in re.findall(r"^\s*(\d+) (passing|failing|pending)\b",
                                                   text, re.MULTILINE)}  # fmt: skip


def clean_env(*bin_dirs: Path) -> dict[str, str]:
    """A shell's environment with nothing of faas-ci's (its virtualenv, its settings)."""
    path = ":".join([*map(str, bin_dirs), "/usr/local/bin", "/usr/bin", "/bin"])
    keep = {k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "PATH": path}


def sh(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def direct_python(repo: Path, work: Path) -> Verdict:
    """A fresh virtualenv; the project editable with its `tests` group (what its own tox
    uses) and the ruff its pre-commit pins; then pytest and `ruff check --no-fix`."""
    src, venv = work / "src", work / "venv"
    git(work, "clone", "--quiet", str(repo), str(src))
    groups = tomllib.loads((src / "pyproject.toml").read_text())["dependency-groups"]
    pin = re.search(r"ruff-pre-commit\n\s+rev: .*?v([\d.]+)",
                    (src / ".pre-commit-config.yaml").read_text())  # fmt: skip
    env = clean_env(venv / "bin")
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = sh(["python", "-m", "pip", "install", "-q", "-e", ".",
                  *dependency_groups.resolve(groups, "tests"), f"ruff=={pin.group(1)}"],
                 src, env)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    installed = time.monotonic()
    tests = sh(["python", "-m", "pytest"], src, env)
    lint = sh(["ruff", "check", "--no-fix", "."], src, env)
    return Verdict(lint.returncode == 0, tests.returncode == 0, counts_of(tests.stdout),
                   installed - start, time.monotonic() - installed)  # fmt: skip


def direct_node(repo: Path, work: Path) -> Verdict:
    """`npm install`, then `npm test` and `npm run lint`."""
    src = work / "src"
    git(work, "clone", "--quiet", str(repo), str(src))
    env = clean_env(src / "node_modules" / ".bin")
    start = time.monotonic()
    install = sh(["npm", "install", "--no-audit", "--no-fund"], src, env)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = time.monotonic()
    tests = sh(["npm", "test"], src, env)
    lint = sh(["npm", "run", "lint"], src, env)
    return Verdict(lint.returncode == 0, tests.returncode == 0, counts_of(tests.stdout),
                   installed - start, time.monotonic() - installed)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Each corpus project as three committed repositories: as shipped, with a pipeline file
    equivalent to the default, and with one test broken."""
    parent = tmp_path_factory.mktemp("corpus")
    repos = {}
    for name in CORPUS_PROJECTS:
        shipped = corpus_repo(name, parent)
        with_file = corpus_repo(name, parent, f"{name}-file")
        (with_file / ".faasci.yml").write_text(PIPELINE_FILES[name])
        commit_all(with_file, "a pipeline file saying what the default says")
        broken = corpus_repo(name, parent, f"{name}-broken")
        path, text, wrong, _ = BREAKS[name]
        source = (broken / path).read_text()
        assert source.count(text) == 1, f"{name}: {text!r} is not one assertion of {path}"
        (broken / path).write_text(source.replace(text, wrong))
        commit_all(broken, "break one test")
        repos[name] = {"shipped": shipped, "file": with_file, "broken": broken}
    return repos


class Runs:
    """faas-ci runs started at once on the test stack, awaited on first look."""

    def __init__(self, gateway, repos: dict[str, dict[str, Path]]):
        self.gateway, self.ids, self.done = gateway, {}, {}
        for name, variants in repos.items():
            for variant, repo in variants.items():
                resp = gateway.call("runs", {"repo": str(repo)})
                assert resp.status_code == 201, resp.text
                self.ids[name, variant] = resp.json()["id"]

    def get(self, name: str, variant: str) -> tuple[dict, dict[str, str]]:
        """The finished run and the log of each stage's last attempt."""
        if (name, variant) not in self.done:
            run = wait_for_run(self.gateway, self.ids[name, variant], timeout=RUN_TIMEOUT)
            logs = {
                stage["name"]: self.gateway.call(
                    "pipeline-log", method="GET",
                    path=f"{run['id']}/{stage['name']}/{stage['attempts'][-1]['number']}",
                ).text
                for stage in run["stages"] if stage["attempts"]
            }  # fmt: skip
            self.done[name, variant] = run, logs
        return self.done[name, variant]


@pytest.fixture(scope="module")
def runs(gateway, corpus) -> Runs:
    """Every repository of `corpus` started through faas-ci at once (before the truth is
    established, so the two overlap)."""
    return Runs(gateway, corpus)


@pytest.fixture(scope="module")
def truth(corpus, runs, tmp_path_factory) -> dict[str, Verdict]:
    """Each project's own verdict and counts: its suite run directly in a fresh environment,
    the four projects side by side, once per module."""
    work = tmp_path_factory.mktemp("truth")

    def establish(name: str) -> Verdict:
        (work / name).mkdir()
        direct = direct_node if name == "mime-types" else direct_python
        return direct(corpus[name]["shipped"], work / name)

    with ThreadPoolExecutor(len(CORPUS_PROJECTS)) as pool:
        verdicts = dict(zip(CORPUS_PROJECTS, pool.map(establish, CORPUS_PROJECTS), strict=True))
    for name, v in verdicts.items():
        print(f"truth {name}: lint {'passed' if v.lint_passed else 'failed'}, unit "
              f"{'passed' if v.unit_passed else 'failed'} {v.counts}, install "
              f"{v.install_s:.1f}s, tests and lint {v.test_s:.1f}s")  # fmt: skip
    return verdicts


def verdict_of(run: dict, logs: dict[str, str]) -> Verdict:
    status = {stage["name"]: stage["status"] for stage in run["stages"]}
    return Verdict(status["lint"] == "passed", status["unit"] == "passed",
                   counts_of(logs.get("unit", "")))  # fmt: skip


def explained(run: dict, logs: dict[str, str]) -> str:
    """What to print when a run disagrees: its stages and the tail of each log."""
    lines = [f"run {run['id']} {run['status']}"]
    for stage in run["stages"]:
        last = stage["attempts"][-1] if stage["attempts"] else {}
        attempts = len(stage["attempts"])
        lines.append(f"{stage['name']}: {stage['status']} after {attempts} attempt(s), "
                     f"exit {last.get('exit_code')}, {last.get('error') or ''}")  # fmt: skip
        lines += [f"  | {line}" for line in logs.get(stage["name"], "").splitlines()[-40:]]
    return "\n".join(lines)


@pytest.mark.parametrize("variant", ["shipped", "file"])
@pytest.mark.parametrize("name", CORPUS_PROJECTS)
def test_a_run_gives_the_projects_own_verdict_and_counts(name, variant, runs, truth):
    """Without a pipeline file (the default) and with an equivalent one, each project's run
    gives the same lint and unit verdicts and the same test counts as its suite run directly."""
    expected = truth[name]
    assert expected.counts, f"{name}: no counts in the direct run's output"
    run, logs = runs.get(name, variant)
    got = verdict_of(run, logs)
    why = explained(run, logs)
    assert run["snapshot"] is False
    assert (got.lint_passed, got.unit_passed) == (expected.lint_passed, expected.unit_passed), why
    assert got.counts == expected.counts, why
    expected_status = "passed" if expected.lint_passed and expected.unit_passed else "failed"
    assert run["status"] == expected_status, why


@pytest.mark.parametrize("name", CORPUS_PROJECTS)
def test_a_broken_test_fails_at_unit_with_its_name_in_the_log(name, runs, truth, gateway):
    """A commit that makes one assertion false fails the run at `unit` after the default's
    three retries (a failing test is retried, as the seed says), and `faasci logs` names the
    test."""
    run, logs = runs.get(name, "broken")
    why = explained(run, logs)
    status = {stage["name"]: stage["status"] for stage in run["stages"]}
    assert status == {"lint": "passed" if truth[name].lint_passed else "failed",
                      "unit": "failed"}, why  # fmt: skip
    unit = run["stages"][1]
    assert len(unit["attempts"]) == 4, why
    assert all(a["reason"] == "exit" and a["exit_code"] != 0 for a in unit["attempts"]), why
    counts = counts_of(logs["unit"])
    assert counts.get("failed", counts.get("failing", 0)) >= 1, why
    env = {**os.environ, "OPENFAAS_URL": gateway.url}
    shown = subprocess.run([FAASCI, "logs", run["id"], "unit"], capture_output=True, text=True,
                           env=env, timeout=60)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert BREAKS[name][3] in shown.stdout, why
