"""Benchmarks of faas-ci (not tests), printed as one JSON object of figures.

`./scripts/bench [corpus] [noop] [cache] [--repeat N] [--project NAME]` prints ONE JSON
object on stdout (progress goes to stderr). With no names, every part runs. Everything runs
on one local stack of the benchmark's own (BENCH_STACK: its own FAASCI_HOME and ports),
started once and stopped at the end, also on an error.

What each figure means:

- `corpus.<project>`: each project of ../shared/corpus (*.tar.gz), unpacked, `git init` and
  committed as a user would, run with the pipeline faas-ci gives it (its default pipeline
  when it has no .faasci.yml, exactly what `faasci run --explain` prints).
  - faas-ci: POST /function/runs {"repo": <path>}, then GET /function/runs/<id> every
    POLL_S until the run has ended; the wall time runs from before the POST to the poll
    that sees the end. `cold`: no dependency cache anywhere (every S3 entry purged through
    the cache-invalidator, the node-local layer `LocalConfig.cache_dir` deleted) before
    each run. `warm`: the same commit again right after a run of it (its cache present).
  - shell: the baseline, the same commands as a plain `set -e` bash script in a fresh
    checkout. The script clones the commit (`git clone` + `git checkout`, timed, as
    faas-ci's own checkouts are) at the same stable path the stages see it at
    (settings().workspace/src), with HOME a fresh empty folder (workspace/home), a clean
    environment (the pipeline's `env`, CI=true, LANG=C.UTF-8) and PATH = the checkout's
    .venv/bin and node_modules/.bin, then this process's PATH without any virtualenv's bin.
    Each command runs as `/bin/sh -c <command>` in the service's folder, as in a stage.
    `cold`: the cache set-up, then per stage its cache `prepare` (when the stage uses the
    cache) and its `run` commands. `warm`: the same fresh clone, but the cache `paths`
    (.venv, node_modules, ~/...) kept from the previous shell run at that same path (moved
    aside before the clone, moved back into it by the script), then prepare + run per stage.
  - `overhead_ratio_warm` / `overhead_ratio_cold`: median faas-ci wall / median shell wall
    (target: <= 1.15 warm, <= 1.10 cold). Per repeat the four runs go back to back: faas-ci
    cold, faas-ci warm, shell cold, shell warm (--repeat N times, default 3). Beside the
    medians: every sample (seconds), each side's verdict (`verdicts_match`: a ratio only
    compares like with like when both sides passed, or both failed), faas-ci's run ids,
    what each run's first cached stage found (`first_cache`: "miss", "local", "s3"), and
    `stages`, the median of where faas-ci's time went per stage (see `stage_profile`).
    The shell scripts and their output stay in <FAASCI_HOME>/shell-logs/.
- `noop_pipeline_s`: a 2-stage pipeline of `true` (lint and unit, no cache): the median wall
  of NOOP_RUNS warm runs, after one discarded run (target <= 0.5).
- `restore_ms_p50`: the median of the cache restore times (`cache.restore_s` x 1000) of
  every stage attempt of the warm corpus runs (target <= 50).
- `cache`: the example service (examples/sample-service) with a cold, then a warm dependency
  cache: the first stage's dependency seconds (set-up + save cold, restore warm), the
  archive's size and both pipelines' wall times.
- `logs`: a stage that writes LOG_WRITTEN_MB of output, with the bench stack's per-attempt
  cap (FAASCI_LOG_MAX_BYTES) at LOG_CAP: the stored log's size (its head and tail, with the
  note saying what was cut), then that log read through the gateway
  (GET /function/pipeline-log/<run>/unit/1, streamed in 64 KiB blocks, discarded) and
  printed by `faasci logs <run> unit > /dev/null`. Sampled every RSS_SAMPLE_S meanwhile: the
  resident memory (MiB) of the serving processes, pipeline-log and the gateway, idle
  before and at their peak while serving (target: < 100), and the CLI's peak (its
  ru_maxrss). Also the unit function's peak while its stage streamed the log live to S3.
- `hops`: HOP_RUNS runs, one after another, of a six-stage pipeline of `true`: every hop, from
  one stage attempt's end (finished_at in the record) to the next stage's attempt start
  (its started_at), in ms: `hop_ms_p50`, `hop_ms_p99` (targets <= 5 and <= 50), over at
  least 200 hops.
- `throughput`: BURST_RUNS runs of the same pipeline started at once (POSTed from 20
  threads): `runs` started, `runs_lost` (not ended passed within BURST_TIMEOUT_S),
  `runs_duplicated` (a stage with more than one attempt, or a run id given twice) and
  `runs_per_minute`, runs that passed per minute from the first run's creation to the last
  end, both from the records (target >= 600). Meanwhile only the run started last is read
  (every 0.5 s), then every run once it has ended: reading all 100 all along cost the stack
  about a tenth of its CPU.
- `cold_start_ms`: a function scaled to zero, then to one (the gateway's
  /system/scale-function), until its first good answer (200 from GET /_/ready through the
  gateway), polled every 5 ms: the median over COLD_STARTS starts of each of COLD_FUNCTIONS
  (target <= 300).
- `observability_overhead_ratio`: the median wall of OBSERVED_RUNS runs of the six-stage
  pipeline with tracing and metrics on (as always), over the same with both switched off
  (OBSERVABILITY_OFF), each side on a freshly started stack, on and off alternating for
  OBSERVED_ROUNDS rounds (a fresh stack alone moves the wall by more than the target)
  (target <= 1.02).
- `polling`: the interval of the runs' polling and how long one GET took (its cost).
- `machine`: where the figures were taken (with the load average at the start and the end:
  other work on the machine skews every figure).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
BENCH_STACK = {
    "FAASCI_STACK": str(ROOT / "stack.yml"),
    "FAASCI_HOME": str(ROOT / ".faasci" / "bench"),
    "FAASCI_SECRETS_DIR": str(ROOT / ".faasci" / "bench" / "secrets"),
    "OPENFAAS_URL": "http://127.0.0.1:38080",
    "FAASCI_NATS_PORT": "34222",
    "FAASCI_S3_PORT": "38333",
    "FAASCI_LOG_MAX_BYTES": "200M",  # the cap the logs part sees its 300 MB log cut to
}
PARTS = ("corpus", "noop", "cache", "logs", "hops", "throughput", "cold_start", "observability")
TARGETS = {"overhead_ratio_warm": 1.15, "overhead_ratio_cold": 1.10,
           "noop_pipeline_s": 0.5, "restore_ms_p50": 50,
           "log_serving_rss_mib": 100, "hop_ms_p50": 5, "hop_ms_p99": 50,
           "runs_lost": 0, "runs_duplicated": 0, "runs_per_minute": 600,
           "cold_start_ms": 300, "observability_overhead_ratio": 1.02}  # fmt: skip
POLL_S = 0.025  # how often a run's record is read while it runs
RUN_TIMEOUT_S = 3600
NOOP_RUNS = 5  # counted, after one discarded
FINISHED = ("passed", "failed", "cancelled")
GIT_USER = ["-c", "user.name=bench", "-c", "user.email=bench@localhost",
            "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]  # fmt: skip
LOG_WRITTEN_MB = 300
LOG_CAP = 200 * 2**20
RSS_SAMPLE_S = 0.02
LOG_SERVES = 3
NOOP_PIPELINE = """\
service: noop
stages:
  lint: {run: ["true"]}
  unit: {run: ["true"]}
"""
SIX_STAGES = ("lint", "unit", "build", "integration", "promote", "deploy")
TRIVIAL_PIPELINE = "service: trivial\nstages:\n" + "".join(
    f'  {name}: {{run: ["true"]}}\n' for name in SIX_STAGES
)
HOP_RUNS = 41  # five hops each: 205 hops
BURST_RUNS = 100  # started at once
BURST_TIMEOUT_S = 900
COLD_STARTS = 5  # per function, after one discarded
COLD_FUNCTIONS = ("lint", "runs")
OBSERVED_RUNS = 10  # per side and round of the observability overhead, after one discarded
OBSERVED_ROUNDS = 3
# Switch tracing and metrics off in every function (the "without" side of the overhead).
OBSERVABILITY_OFF = {"FAASCI_TRACING": "off", "FAASCI_METRICS": "off"}


def say(*parts) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def verdict(values: list[str]) -> str | list[str]:
    """One verdict when every sample agrees, else all of them."""
    return values[0] if values and len(set(values)) == 1 else values


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not (start and end):
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


# The stack and its runs.


class Stack:
    """The benchmark's own local stack, and what it does with it."""

    def __init__(self):
        from faasci.invoke import Gateway
        from faasci.local import oidc
        from faasci.local.config import LocalConfig

        self.cfg = LocalConfig.from_env()
        # As the local user (the stack's OIDC provider issues the token, as for the CLI).
        self.gateway = Gateway(self.cfg.gateway_url, timeout=120,
                               token=lambda: oidc.token(self.cfg))  # fmt: skip
        self.polls_ms: list[float] = []  # how long each GET of a running run took

    def up(self, tries: int = 2) -> None:
        """Start the stack; once more after a failed start (a function's port can be taken
        for a moment by some other program's connection)."""
        from faasci.local import control

        for left in reversed(range(tries)):
            try:
                if not control.up(self.cfg, say=say):
                    say("note: the bench stack was already up; it is stopped at the end anyway")
                return
            except SystemExit as e:
                if not left:
                    raise RuntimeError(f"the stack did not come up: {e}") from None
                say(f"{e}; trying once more")
                self.down()

    def down(self) -> None:
        from faasci.local import control

        control.down(self.cfg, say=say)

    def run(self, repo: str) -> tuple[float, dict]:
        """Start a run of `repo` and poll it until it ends: (wall seconds, its record)."""
        started = time.monotonic()
        resp = self.gateway.call("runs", {"repo": repo}, timeout=300)
        if resp.status_code >= 300:
            raise RuntimeError(f"POST /function/runs: HTTP {resp.status_code} {resp.text[:300]}")
        run_id = resp.json()["id"]
        while True:
            time.sleep(POLL_S)
            asked = time.monotonic()
            got = self.gateway.call("runs", method="GET", path=run_id)
            self.polls_ms.append((time.monotonic() - asked) * 1000)
            record = got.json() if got.ok else {}
            if record.get("status") in FINISHED:
                wall = round(time.monotonic() - started, 3)
                if record["status"] != "passed":
                    say(f"  {self.failure(record)}")
                return wall, record
            if time.monotonic() - started > RUN_TIMEOUT_S:
                self.gateway.call("runs", path=f"{run_id}/cancel")
                raise RuntimeError(f"run {run_id} not finished after {RUN_TIMEOUT_S}s: cancelled")

    def pids(self, names: list[str]) -> dict[str, int]:
        """The pids of functions (from the gateway's /system/functions) and of "gateway"."""
        from faasci.local import control, processes

        listed = requests.get(f"{self.gateway.url}/system/functions", timeout=30,
                              auth=control.system_auth(self.cfg)).json()  # fmt: skip
        pids = {f["name"]: f["pid"] for f in listed if f["name"] in names}
        if "gateway" in names:
            pids["gateway"] = processes.pid_of(self.cfg.run, "gateway")
        return pids

    def forget_caches(self) -> None:
        """No dependency cache anywhere: every S3 entry purged, the node-local layer gone.
        Purged again while entries show up (an upload that was still on its way)."""
        for _ in range(10):
            resp = self.gateway.call("cache-invalidator", {"all": True}, path="purge")
            if resp.status_code >= 300:
                raise RuntimeError(f"cache purge: HTTP {resp.status_code} {resp.text[:300]}")
            remove_tree(self.cfg.cache_dir)
            time.sleep(0.5)
            if not self.gateway.call("cache-invalidator", method="GET").json()["entries"]:
                return
        raise RuntimeError("cache entries keep appearing after purges")

    def failure(self, run: dict) -> str:
        """The end of the log of a failed run's failed attempt, for the progress output."""
        for stage in run["stages"]:
            for attempt in stage["attempts"]:
                if attempt["status"] == "failed":
                    where = f"{run['id']}/{stage['name']}/{attempt['number']}"
                    resp = self.gateway.call("pipeline-log", method="GET", path=where)
                    tail = resp.text.splitlines()[-12:] if resp.ok else [f"HTTP {resp.status_code}"]
                    return f"{where}: {attempt.get('error')}\n    " + "\n    ".join(tail)
        return f"run {run['id']} {run['status']}"


def remove_tree(path: Path) -> None:
    """rmtree that also takes read-only folders (caches and overlays leave some)."""

    def unlock(func, failed, _exc):
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            shutil.rmtree(failed) if os.path.isdir(failed) else os.unlink(failed)
        except FileNotFoundError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=unlock)


def stage_profile(run: dict) -> list[dict]:
    """Where a run's time went, per stage (its last attempt), from its record: `wait_s` from
    the previous stage's end (or the run's creation) to the attempt's start, the attempt's
    `attempt_s`, of which the cache's `restore_s`, `setup_s` and `save_s`, and `other_s`
    (checkout, sandbox, prepare and the commands, the log's upload)."""
    profile, previous_end = [], run.get("created_at")
    for stage in run["stages"]:
        if not stage["attempts"]:
            continue
        attempt = stage["attempts"][-1]
        cache = attempt.get("cache") or {}
        spent = {k: cache.get(k, 0) or 0 for k in ("restore_s", "setup_s", "save_s")}
        total = attempt.get("duration_s") or 0
        profile.append({
            "stage": stage["name"],
            "wait_s": seconds_between(previous_end, attempt.get("started_at")),
            "attempt_s": total,
            **spent,
            "other_s": round(total - sum(spent.values()), 3),
        })  # fmt: skip
        previous_end = attempt.get("finished_at")
    return profile


def median_profile(runs: list[dict]) -> list[dict]:
    """Per stage, the median of each figure of `stage_profile` over `runs`."""
    by_stage: dict[str, list[dict]] = {}
    for run in runs:
        for row in stage_profile(run):
            by_stage.setdefault(row["stage"], []).append(row)
    merged = []
    for name, rows in by_stage.items():
        row = {"stage": name, "samples": len(rows)}
        for key in ("wait_s", "attempt_s", "restore_s", "setup_s", "save_s", "other_s"):
            row[key] = median([r[key] for r in rows if r[key] is not None])
        merged.append(row)
    return merged


def first_cache(run: dict) -> str | None:
    """What the first stage that used the cache found: "miss", or where its hit came from."""
    for stage in run["stages"]:
        for attempt in stage["attempts"]:
            if cache := attempt.get("cache"):
                return (cache.get("source") or "hit") if cache.get("hit") else "miss"
    return None


def restore_ms(runs: list[dict]) -> list[float]:
    """The cache restore time (ms) of every stage attempt of `runs` that restored one."""
    return [
        round(attempt["cache"]["restore_s"] * 1000, 1)
        for run in runs
        for stage in run["stages"]
        for attempt in stage["attempts"]
        if (attempt.get("cache") or {}).get("hit")
    ]


# Repositories, as a user's would be.


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *GIT_USER, *args], cwd=cwd, capture_output=True, text=True,
                          check=True, stdin=subprocess.DEVNULL)  # fmt: skip
    return done.stdout.strip()


def commit_all(repo: Path) -> None:
    git("init", "--quiet", str(repo))
    git("add", "--all", cwd=repo)
    git("commit", "--quiet", "--no-verify", "-m", "import", cwd=repo)


def unpack(archive: Path, into: Path) -> Path:
    """The project of a corpus archive, unpacked and committed into a new git repository."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    tops = [p for p in into.iterdir() if p.is_dir()]
    repo = tops[0] if len(tops) == 1 else into
    commit_all(repo)
    return repo


def noop_repo(into: Path) -> Path:
    repo = into / "noop"
    repo.mkdir(parents=True)
    (repo / ".faasci.yml").write_text(NOOP_PIPELINE)
    commit_all(repo)
    return repo


# The shell baseline.


@dataclass
class Plan:
    """What a run of a repository does, for the shell baseline to do the same."""

    source: str  # the repository to clone
    commit: str
    path: str  # the service's folder inside it
    spec: object  # faasci.pipeline.Pipeline

    def steps(self, warm: bool) -> list[tuple[str, list[str]]]:
        """The commands, in order: ("setup", the cache's set-up) when cold, then per stage
        (its name, its cache's prepare when it uses the cache + its run commands)."""
        cache = self.spec.cache
        steps = [("setup", list(cache.setup))] if cache and not warm else []
        for name, stage in self.spec.stages.items():
            steps.append((name, [*(cache.prepare if cache and stage.cache else []), *stage.run]))
        return steps

    def commands(self, warm: bool) -> list[str]:
        return [command for _, commands in self.steps(warm) for command in commands]

    def kept_paths(self) -> list[str]:
        """The dependency folders a warm shell run keeps from the previous one."""
        return list(self.spec.cache.paths) if self.spec.cache else []


def plan_of(repo: Path) -> Plan:
    """The pipeline a run of `repo` gets, resolved as `faasci run --explain` does."""
    from faasci import git as faasci_git
    from faasci import pipeline

    with tempfile.TemporaryDirectory(prefix="faasci-bench-explain-") as scratch:
        resolved = faasci_git.resolve(str(repo), None, Path(scratch) / "snapshots.git",
                                      Path(scratch))  # fmt: skip
        spec = pipeline.load(resolved.pipeline_text, resolved.files, resolved.name,
                             resolved.read)  # fmt: skip
    return Plan(resolved.source, resolved.commit, resolved.path, spec)


def clean_path() -> str:
    """This process's PATH without any virtualenv's bin."""
    entries = os.environ.get("PATH", "/usr/bin:/bin").split(":")
    return ":".join(e for e in entries if e and not (Path(e).parent / "pyvenv.cfg").exists())


def step_seconds(marks: Path) -> dict[str, float]:
    """Seconds per step of a baseline script, from the times it noted as each began."""
    try:
        noted = [line.split(" ", 1) for line in marks.read_text().splitlines()]
    except FileNotFoundError:
        return {}
    return {label: round(float(end) - float(start), 3)
            for (start, label), (end, _) in itertools.pairwise(noted)}  # fmt: skip


class Shell:
    """The baseline's checkout, HOME and kept dependency folders, at the stages' stable
    workspace (only the stages' private mount namespaces see theirs there)."""

    def __init__(self, logs: Path):
        from faasci.settings import settings

        workspace = settings().workspace
        self.src, self.home = workspace / "src", workspace / "home"
        self.kept = workspace / "bench-kept"  # beside src: moving back is a rename
        self.logs, self.runs = logs, 0  # every run's output, kept after the bench
        remove_tree(logs)
        logs.mkdir(parents=True)

    def service_dir(self, plan: Plan) -> Path:
        return self.src / plan.path if plan.path else self.src

    def run(self, plan: Plan, warm: bool) -> tuple[float, int, dict[str, float]]:
        """One baseline run: (wall seconds, the script's exit status, seconds per step)."""
        self._set_aside(plan, keep=warm)
        self.runs += 1
        name = f"{self.runs:02d}-{Path(plan.source).name}-{'warm' if warm else 'cold'}"
        script, log = self.logs / f"{name}.sh", self.logs / f"{name}.log"
        marks = self.logs / f"{name}.marks"
        script.write_text(self.script(plan, warm, marks))
        env = {**plan.spec.env, "CI": "true", "LANG": "C.UTF-8", "HOME": str(self.home),
               "PATH": self.path(plan)}  # fmt: skip
        started = time.monotonic()
        with log.open("wb") as out:
            done = subprocess.run(["/bin/bash", str(script)], env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT, cwd="/")  # fmt: skip
        elapsed = round(time.monotonic() - started, 3)
        if done.returncode:
            tail = log.read_text(errors="replace").splitlines()[-8:]
            say(f"  shell exited {done.returncode} ({log}):", "\n    " + "\n    ".join(tail))
        return elapsed, done.returncode, step_seconds(marks)

    def path(self, plan: Plan) -> str:
        service = self.service_dir(plan)
        return f"{service}/.venv/bin:{service}/node_modules/.bin:{clean_path()}"

    def script(self, plan: Plan, warm: bool, marks: Path) -> str:
        """The baseline script. Beside the commands it only notes the time (bash builtins,
        into `marks`) as each step starts and when it ends."""
        q = shlex.quote

        def mark(label: str) -> str:
            return f'printf "%s {label}\\n" "$EPOCHREALTIME" >&9'

        lines = [
            "set -e",
            f"exec 9>{q(str(marks))}",
            f"trap '{mark('end')}' EXIT",
            mark("checkout"),
            f"git clone --quiet --no-checkout -- {q(plan.source)} {q(str(self.src))}",
            f"git -C {q(str(self.src))} checkout --quiet --detach {q(plan.commit)}",
            f"cd {q(str(self.service_dir(plan)))}",
        ]
        if warm:  # the dependency folders of the last run, back in place
            for live, kept in self._kept(plan):
                if kept.exists():
                    lines.append(f"mkdir -p {q(str(live.parent))} && mv {q(str(kept))} "
                                 f"{q(str(live))}")  # fmt: skip
        for label, commands in plan.steps(warm):
            lines.append(mark(label))
            lines += [f"/bin/sh -c {q(command)}" for command in commands]
        return "\n".join(lines) + "\n"

    def _kept(self, plan: Plan) -> list[tuple[Path, Path]]:
        """(where a dependency folder lives, where it waits between runs) per cache path."""
        pairs = []
        for n, path in enumerate(plan.kept_paths()):
            home = path.startswith("~/")
            live = self.home / path[2:] if home else self.service_dir(plan) / path
            pairs.append((live, self.kept / str(n)))
        return pairs

    def _set_aside(self, plan: Plan, keep: bool) -> None:
        """A fresh start: no checkout, an empty HOME; with `keep`, the dependency folders
        of the last run moved aside first (so the script can move them back)."""
        remove_tree(self.kept)
        self.kept.mkdir(parents=True)
        if keep:
            for live, kept in self._kept(plan):
                if live.exists():
                    live.rename(kept)
        for folder in (self.src, self.home):
            remove_tree(folder)
        self.home.mkdir(parents=True)

    def clean(self) -> None:
        for folder in (self.src, self.home, self.kept):
            remove_tree(folder)


# The benchmarks.


@dataclass
class Samples:
    """One side's runs of one kind (cold or warm) of a project."""

    walls: list[float] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    details: list = field(default_factory=list)  # run records, or (exit status, step seconds)

    def add(self, wall: float, outcome: str, detail) -> None:
        self.walls.append(wall)
        self.verdicts.append(outcome)
        self.details.append(detail)

    def figures(self) -> dict:
        return {"median_s": median(self.walls), "samples_s": self.walls,
                "verdict": verdict(self.verdicts)}  # fmt: skip


KINDS = ("cold", "warm")


def median_steps(runs: list[dict[str, float]]) -> dict[str, float | None]:
    """Per step of the baseline (checkout, setup, each stage), its median seconds."""
    labels = list(dict.fromkeys(label for steps in runs for label in steps))
    return {label: median([s[label] for s in runs if label in s]) for label in labels}


def bench_project(stack: Stack, shell: Shell, repo: Path, repeat: int) -> tuple[dict, list[dict]]:
    """One corpus project: its figures, and its warm runs' records. Per repeat, back to back:
    faas-ci cold (no cache anywhere), faas-ci warm, shell cold, shell warm."""
    plan = plan_of(repo)
    faasci = {kind: Samples() for kind in KINDS}
    baseline = {kind: Samples() for kind in KINDS}
    for n in range(1, repeat + 1):
        stack.forget_caches()
        for kind in KINDS:
            wall, record = stack.run(str(repo))
            faasci[kind].add(wall, record["status"], record)
            say(f"  {repo.name} #{n} faas-ci {kind}: {wall:.2f}s {record['status']} "
                f"(run {record['id']})")  # fmt: skip
        for kind in KINDS:
            wall, code, steps = shell.run(plan, warm=kind == "warm")
            baseline[kind].add(wall, "passed" if code == 0 else "failed", (code, steps))
            say(f"  {repo.name} #{n} shell {kind}: {wall:.2f}s exit {code}")
    result = {"commit": plan.commit[:12]}
    for kind in ("warm", "cold"):
        result[f"overhead_ratio_{kind}"] = ratio(median(faasci[kind].walls),
                                                 median(baseline[kind].walls))  # fmt: skip
    # A ratio compares like with like only when both sides reached the same verdict.
    result["verdicts_match"] = all(faasci[k].verdicts == baseline[k].verdicts for k in KINDS)
    result["faasci"] = {
        kind: {**faasci[kind].figures(),
               # the run's own duration (creation to end): the rest of the wall is the
               # POST and the polling
               "record_median_s": median([r["duration_s"] for r in faasci[kind].details
                                          if r.get("duration_s") is not None]),
               "stages": median_profile(faasci[kind].details),
               "first_cache": [first_cache(r) for r in faasci[kind].details],
               "runs": [r["id"] for r in faasci[kind].details]}
        for kind in ("warm", "cold")
    }  # fmt: skip
    result["shell"] = {
        kind: {**baseline[kind].figures(),
               "exit_codes": [code for code, _ in baseline[kind].details],
               "steps": median_steps([steps for _, steps in baseline[kind].details]),
               "commands": plan.commands(warm=kind == "warm")}
        for kind in ("warm", "cold")
    }  # fmt: skip
    return result, faasci["warm"].details


def bench_corpus(stack: Stack, scratch: Path, repeat: int, only: list[str]) -> dict:
    archives = sorted(CORPUS.glob("*.tar.gz"))
    if only:
        archives = [a for a in archives if a.name.removesuffix(".tar.gz") in only]
    shell = Shell(stack.cfg.home / "shell-logs")
    projects, warm_runs = {}, []
    try:
        for archive in archives:
            name = archive.name.removesuffix(".tar.gz")
            say(f"corpus: {name}")
            folder = scratch / "corpus" / name
            folder.mkdir(parents=True)
            try:
                projects[name], runs = bench_project(stack, shell, unpack(archive, folder), repeat)
                warm_runs += runs
            except Exception as e:  # one project's trouble must not lose the others' figures
                say(f"  {name} failed:\n{traceback.format_exc()}")
                projects[name] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        shell.clean()
    restores = restore_ms(warm_runs)
    return {"projects": projects, "restore_ms_p50": median(restores), "restore_ms": restores}


def bench_noop(stack: Stack, scratch: Path) -> dict:
    repo = noop_repo(scratch / "noop")
    stack.run(str(repo))  # discarded: the first run of a repository warms the functions
    walls, records = [], []
    for n in range(1, NOOP_RUNS + 1):
        wall, record = stack.run(str(repo))
        say(f"noop #{n}: {wall:.3f}s {record['status']}")
        walls.append(wall)
        records.append(record)
    return {"noop_pipeline_s": median(walls), "samples_s": walls,
            "verdict": verdict([r["status"] for r in records]),
            "stages": median_profile(records)}  # fmt: skip


def dependency_seconds(attempt: dict) -> float:
    """Set-up + save (a miss) or restore (a hit), to 0.1 ms: a local restore takes less than 1."""
    cache = attempt["cache"] or {}
    return round(cache.get("restore_s", 0) + cache.get("setup_s", 0) + cache.get("save_s", 0), 4)


def bench_cache(stack: Stack) -> dict:
    """The example service with a cold, then a warm dependency cache."""
    repo = str(ROOT / "examples" / "sample-service")
    stack.forget_caches()
    (cold_wall, cold), (warm_wall, warm) = stack.run(repo), stack.run(repo)
    for run in (cold, warm):
        if run["status"] != "passed":
            raise RuntimeError(f"run {run['id']} {run['status']}: the benchmark needs passing runs")
    first_cold, first_warm = cold["stages"][0]["attempts"][0], warm["stages"][0]["attempts"][0]
    if not (first_cold["cache"]["hit"] is False and first_warm["cache"]["hit"] is True):
        raise RuntimeError("the cold run's first stage should miss and the warm one's hit")
    cold_s, warm_s = dependency_seconds(first_cold), dependency_seconds(first_warm)
    return {
        "cold_s": cold_s,
        "warm_s": warm_s,
        "speedup": round(cold_s / warm_s, 1) if warm_s else None,  # None: warm took < 0.1 ms
        "target_speedup": 3,
        "archive_bytes": first_cold["cache"]["saved_bytes"],
        "cold_pipeline_s": cold["duration_s"],
        "warm_pipeline_s": warm["duration_s"],
        "cold_wall_s": cold_wall,
        "warm_wall_s": warm_wall,
        "cold_dependencies_all_stages_s": round(
            sum(dependency_seconds(s["attempts"][0]) for s in cold["stages"] if s["attempts"]), 3),
        "warm_dependencies_all_stages_s": round(
            sum(dependency_seconds(s["attempts"][0]) for s in warm["stages"] if s["attempts"]), 3),
    }  # fmt: skip


class PeakRss:
    """Samples the resident memory of some processes (with their children, but for those
    `alone`) in a thread:
    `peak` in MiB per name, from `with` to its end."""

    def __init__(self, pids: dict[str, int], alone: tuple[str, ...] = ("gateway",)):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.alone = alone  # without their children (the gateway's are the functions)
        self.peak = {name: 0.0 for name in pids}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> dict[str, float]:
        return {name: round(rss_mib(proc, name not in self.alone), 1)
                for name, proc in self.procs.items()}  # fmt: skip

    def _sample(self) -> None:
        while not self._done.wait(RSS_SAMPLE_S):
            for name, mib in self.now().items():
                self.peak[name] = max(self.peak[name], mib)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def rss_mib(proc, children: bool = True) -> float:
    import psutil

    try:
        procs = [proc, *(proc.children(recursive=True) if children else ())]
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return 0.0


def read_log(stack: Stack, where: str) -> tuple[int, bool]:
    """GET an attempt's log through the gateway, streamed and discarded: (bytes, whether
    the note of a cut is in it)."""
    served, cut_said, last = 0, False, b""
    url = f"{stack.gateway.url}/function/pipeline-log/{where}"
    with stack.gateway.session.get(url, stream=True, timeout=(10, 600)) as resp:
        resp.raise_for_status()
        for block in resp.iter_content(64 * 1024):
            cut_said = cut_said or b"FAASCI_LOG_MAX_BYTES" in last[-200:] + block
            served, last = served + len(block), block
    return served, cut_said


def bench_logs(stack: Stack, scratch: Path) -> dict:
    """A stage's 300 MB log: capped, then served and printed in constant memory."""
    repo = scratch / "logs"
    repo.mkdir()
    line = "faas-ci log line: " + "0123456789abcdef" * 5  # 99 bytes with its newline
    (repo / ".faasci.yml").write_text(
        "service: logs\nstages:\n  unit:\n    run:\n"
        f"      - {json.dumps(f'yes {line!r} | head -c {LOG_WRITTEN_MB * 2**20}')}\n"
    )
    git("init", "-q", cwd=repo)
    commit_all(repo)
    pids = stack.pids(["pipeline-log", "gateway", "unit"])
    with PeakRss({"unit": pids.pop("unit")}) as writing:
        wall, run = stack.run(str(repo))
    if run["status"] != "passed":
        raise RuntimeError(f"run {run['id']} {run['status']}: the benchmark needs a passing run")
    where = f"{run['id']}/unit/1"
    idle = PeakRss(pids).now()
    peaks, serve_s = [], []
    for _ in range(LOG_SERVES):  # the same log again: memory stays flat, it does not grow
        with PeakRss(pids) as serving:
            started = time.monotonic()
            served, cut_said = read_log(stack, where)
            serve_s.append(round(time.monotonic() - started, 2))
        peaks.append(serving.peak)
    cli = ROOT / ".venv" / "bin" / "faasci"
    started = time.monotonic()
    with open(os.devnull, "wb") as devnull:
        subprocess.run([str(cli), "logs", run["id"], "unit"], stdout=devnull, check=True)
    print_s = time.monotonic() - started
    import resource

    return {
        "written_mb": LOG_WRITTEN_MB,
        "cap_bytes": LOG_CAP,
        "stored_bytes": served,
        "cut_said": cut_said,
        "run_wall_s": wall,
        "serve_s": serve_s,
        "serve_mb_per_s": round(served / 2**20 / median(serve_s), 1),
        "print_s": round(print_s, 1),
        "rss_mib_idle": idle,
        "rss_mib_peak_serving": {name: max(p[name] for p in peaks) for name in pids},
        "rss_mib_peak_per_serve": peaks,
        "rss_mib_peak_cli": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "rss_mib_peak_unit_writing": writing.peak["unit"],
    }


def trivial_repo(into: Path, service: str = "trivial") -> Path:
    repo = into / service
    repo.mkdir(parents=True)
    (repo / ".faasci.yml").write_text(TRIVIAL_PIPELINE.replace("trivial", service, 1))
    commit_all(repo)
    return repo


def percentile(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(len(ordered) * pct / 100) - 1)], 2)


def hops_ms(run: dict) -> list[float]:
    """From each stage's end to the next stage's start (first attempts only), in ms."""
    hops, previous_end = [], None
    for stage in run["stages"]:
        attempts = stage["attempts"]
        if attempts and previous_end:
            hops.append(seconds_between(previous_end, attempts[0]["started_at"]) * 1000)
        previous_end = attempts[-1].get("finished_at") if attempts else None
    return hops


def bench_hops(stack: Stack, scratch: Path) -> dict:
    repo = trivial_repo(scratch / "hops")
    stack.run(str(repo))  # discarded: warms the functions
    hops, statuses = [], []
    for _ in range(HOP_RUNS):
        _, record = stack.run(str(repo))
        hops += hops_ms(record)
        statuses.append(record["status"])
    say(f"hops: {len(hops)}, p50 {percentile(hops, 50)} ms, p99 {percentile(hops, 99)} ms")
    return {"hop_ms_p50": percentile(hops, 50), "hop_ms_p99": percentile(hops, 99),
            "hop_ms_max": max(hops, default=None), "hops": len(hops),
            "verdict": verdict(statuses)}  # fmt: skip


def bench_throughput(stack: Stack, scratch: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    repo = trivial_repo(scratch / "throughput")
    stack.run(str(repo))  # discarded: warms the functions

    def start(_) -> str | None:
        resp = stack.gateway.call("runs", {"repo": str(repo)}, timeout=300)
        return resp.json()["id"] if resp.status_code < 300 else None

    began = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(start, range(BURST_RUNS)))
    started = [i for i in ids if i]  # a refused POST is a lost run
    say(f"throughput: {len(started)} runs started in {time.monotonic() - began:.1f}s")
    # Reading runs costs the stack what is measured: only the run started last is read
    # until it ends (the caps' queue takes runs in order), then every run.
    while started and time.monotonic() - began < BURST_TIMEOUT_S:
        got = stack.gateway.call("runs", method="GET", path=started[-1])
        if got.ok and got.json().get("status") in FINISHED:
            break
        time.sleep(0.5)
    records: dict[str, dict] = {}
    while len(records) < len(set(started)) and time.monotonic() - began < BURST_TIMEOUT_S:
        for run_id in [i for i in started if i not in records]:
            got = stack.gateway.call("runs", method="GET", path=run_id)
            if got.ok and got.json().get("status") in FINISHED:
                records[run_id] = got.json()
        time.sleep(0.5)
    passed = [r for r in records.values() if r["status"] == "passed"]
    ends = [datetime.fromisoformat(r["finished_at"]) for r in passed]
    first = min((datetime.fromisoformat(r["created_at"]) for r in records.values()), default=None)
    span_s = (max(ends) - first).total_seconds() if ends and first else None
    twice = [r for r in records.values() if any(len(s["attempts"]) > 1 for s in r["stages"])]
    loaded = [h for r in passed for h in hops_ms(r)]
    return {"runs": len(ids), "runs_passed": len(passed), "runs_lost": len(ids) - len(passed),
            "runs_duplicated": len(twice) + len(started) - len(set(started)),
            "runs_per_minute": round(len(passed) / span_s * 60, 1) if span_s else None,
            "span_s": round(span_s, 2) if span_s else None,
            "hop_ms_p50_under_load": percentile(loaded, 50)}  # fmt: skip


def scale(stack: Stack, name: str, replicas: int) -> None:
    from faasci.local import control

    resp = requests.post(f"{stack.gateway.url}/system/scale-function/{name}", timeout=30,
                         json={"serviceName": name, "replicas": replicas},
                         auth=control.system_auth(stack.cfg))  # fmt: skip
    if resp.status_code >= 300:
        raise RuntimeError(f"scale {name} to {replicas}: HTTP {resp.status_code} {resp.text[:200]}")


def cold_start_ms(stack: Stack, name: str) -> float:
    """Scaled to zero, then to one: ms until GET /_/ready answers 200 through the gateway."""
    scale(stack, name, 0)
    deadline = time.monotonic() + 60
    while stack.gateway.call(name, method="GET", path="_/ready", timeout=5).status_code == 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} still answers after scaling to zero")
        time.sleep(0.05)
    started = time.monotonic()
    scale(stack, name, 1)
    while time.monotonic() - started < 60:
        try:
            if stack.gateway.call(name, method="GET", path="_/ready", timeout=5).ok:
                return round((time.monotonic() - started) * 1000, 1)
        except requests.RequestException:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{name} not ready 60s after scaling to one")


def bench_cold_start(stack: Stack) -> dict:
    samples = {}
    for name in COLD_FUNCTIONS:
        cold_start_ms(stack, name)  # discarded: the first start after up reads files cold
        samples[name] = [cold_start_ms(stack, name) for _ in range(COLD_STARTS)]
        say(f"cold start {name}: {samples[name]} ms")
    return {"cold_start_ms": median([ms for found in samples.values() for ms in found]),
            "samples_ms": samples}  # fmt: skip


def bench_observability(stack: Stack, scratch: Path) -> dict:
    """The same runs with tracing and metrics on, then off, each on a restarted stack."""
    repo = trivial_repo(scratch / "observed")
    walls: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(OBSERVED_ROUNDS):
        for side, env in (("on", {}), ("off", OBSERVABILITY_OFF)):
            stack.down()
            os.environ.update(env)
            try:
                stack.up()
                stack.run(str(repo))  # discarded: warms the functions
                walls[side] += [stack.run(str(repo))[0] for _ in range(OBSERVED_RUNS)]
            finally:
                for key in env:
                    os.environ.pop(key, None)
    say(f"observability: median on {median(walls['on'])}s, off {median(walls['off'])}s")
    stack.down()  # as the other parts found it
    stack.up()
    return {"observability_overhead_ratio": ratio(median(walls["on"]), median(walls["off"])),
            "on_s": walls["on"], "off_s": walls["off"]}  # fmt: skip


def machine() -> dict:
    node = shutil.which("node")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "node": subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        if node else None,
        "kernel": platform.release(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],  # others' work skews the figures
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def attempt(part: str, fn: Callable[[], dict]) -> dict:
    """A part's figures; its error instead when it fails (the other parts still run)."""
    started = time.monotonic()
    try:
        figures = fn()
    except Exception as e:
        say(f"{part} failed:\n{traceback.format_exc()}")
        figures = {"error": f"{type(e).__name__}: {e}"}
    say(f"{part}: done in {time.monotonic() - started:.0f}s")
    return figures


def run_parts(stack: Stack, scratch: Path, parts: list[str], repeat: int,
              projects: list[str]) -> dict:  # fmt: skip
    figures: dict = {}
    if "corpus" in parts:
        corpus = attempt("corpus", lambda: bench_corpus(stack, scratch, repeat, projects))
        figures["corpus"] = corpus.get("projects", corpus)
        figures["restore_ms_p50"] = corpus.get("restore_ms_p50")
        figures["restore_ms_samples"] = corpus.get("restore_ms")
    if "noop" in parts:
        noop = attempt("noop", lambda: bench_noop(stack, scratch))
        figures["noop_pipeline_s"] = noop.pop("noop_pipeline_s", None)
        figures["noop"] = noop
    if "cache" in parts:
        figures["cache"] = attempt("cache", lambda: bench_cache(stack))
    if "logs" in parts:
        figures["logs"] = attempt("logs", lambda: bench_logs(stack, scratch))
    for part, run in (("hops", lambda: bench_hops(stack, scratch)),
                      ("throughput", lambda: bench_throughput(stack, scratch)),
                      ("cold_start", lambda: bench_cold_start(stack)),
                      ("observability", lambda: bench_observability(stack, scratch))):  # fmt: skip
        if part in parts:
            found = attempt(part, run)
            for key in [k for k in TARGETS if k in found]:  # headline figures on top
                figures[key] = found[key]
            figures[part] = found
    return figures


def run_benchmarks(parts: list[str], repeat: int, projects: list[str]) -> dict:
    """The parts' figures, on the bench's own stack: up once, down at the end."""
    started = time.monotonic()
    result: dict = {"machine": machine(), "targets": TARGETS}
    stack = Stack()
    with tempfile.TemporaryDirectory(prefix="faasci-bench-") as scratch:
        try:
            stack.up()
            result.update(run_parts(stack, Path(scratch), parts, repeat, projects))
        except RuntimeError as e:  # the stack did not come up
            result["error"] = str(e)
        finally:
            stack.down()
            remove_tree(stack.cfg.workdir)  # in memory: not left behind
    result["polling"] = {"interval_ms": POLL_S * 1000, "get_ms_p50": median(stack.polls_ms),
                         "gets": len(stack.polls_ms)}  # fmt: skip
    result["bench_s"] = round(time.monotonic() - started, 1)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="name",
                        help=f"parts to run: {', '.join(PARTS)} (default: all)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="corpus runs per kind (default 3)")
    parser.add_argument("--project", action="append", default=[],
                        help="only this corpus project (repeatable)")  # fmt: skip
    args = parser.parse_args()
    if unknown := set(args.names) - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
    known = {a.name.removesuffix(".tar.gz") for a in CORPUS.glob("*.tar.gz")}
    if unknown := set(args.project) - known:
        parser.error(f"no corpus project {', '.join(sorted(unknown))} in {CORPUS}")
    os.environ.update(BENCH_STACK)  # before faasci reads its settings
    parts = [p for p in PARTS if p in args.names] if args.names else list(PARTS)
    result = run_benchmarks(parts, max(args.repeat, 1), args.project)
    print(json.dumps(result, indent=2))
    sys.exit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()
