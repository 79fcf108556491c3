"""The `faasci` command: the local stack, runs, logs and single invocations.

Everything but `up` and `down` talks HTTP to the gateway, so the same commands work against
a cluster, from any directory: OPENFAAS_URL, else the user configuration `faasci up` writes
(faasci.userconfig: the local stack it started), else stack.yml here or above, else the local
stack's default address.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from . import git, pipeline, userconfig
from .errors import UserError
from .invoke import Gateway
from .local import control
from .local.config import LocalConfig

err = Console(stderr=True)
STYLE = {
    "passed": "green",
    "failed": "red",
    "running": "yellow",
    "queued": "cyan",
    "cancelled": "magenta",
    "skipped": "dim",
    "pending": "dim",
}


class CommandError(Exception):
    """Printed as one line; the command exits 2."""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    added = []  # from the user config: up and down prefer the stack here, others the config's
    if args.command not in (cmd_up, cmd_down) or not stack_file_here():
        added = userconfig.apply()
    try:
        return args.command(args) or 0
    except CommandError as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:  # before a run was started, or in any other command
        err.print("interrupted")
        return 130
    except requests.ConnectionError:
        err.print(
            f"[red]error:[/] the gateway at {gateway_url()} is not reachable "
            "(is the stack up? `faasci up`)"
        )
        return 2
    finally:
        for key in added:  # main() may be called in-process (tests)
            os.environ.pop(key, None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faasci", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"faasci {version()}")
    sub = p.add_subparsers(required=True, metavar="command")

    def command(name, fn, help):
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(command=fn)
        return c

    c = command("up", cmd_up, "start the local stack (idempotent)")
    c.add_argument(
        "--containers",
        action="store_true",
        help="build every function's image and run each as a container (podman)",
    )
    c.add_argument("--observe", action="store_true",
                   help="also run Jaeger (traces) and Prometheus (metrics)")  # fmt: skip
    command("down", cmd_down, "stop the local stack, keeping its data")
    c = command(
        "status", cmd_status, "each part of the local stack: up or down (exit 1 if any is down)"
    )
    c.add_argument("--json", action="store_true", help="print the status as JSON")
    c = command("run", cmd_run, "run the pipeline of a local path or git URL, wait for the result")
    c.add_argument(
        "repo",
        nargs="?",
        default=".",
        help="a folder (its working tree, uncommitted changes included) or a git URL "
        "(default: the current folder)",
    )
    c.add_argument(
        "--explain",
        action="store_true",
        help="print the pipeline it would run (as a .faasci.yml) and why; start nothing",
    )
    c.add_argument("--ref", help="branch, tag or commit (default: the working tree, or HEAD)")
    c.add_argument(
        "--follow", action="store_true", help="show every stage's progress in a table as it runs"
    )
    c.add_argument("--json", action="store_true", help="print the final run record as JSON")
    c.add_argument("--detach", action="store_true", help="start the run and return at once")
    c.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    c = command("runs", cmd_runs, "list recent runs")
    c.add_argument("--limit", type=int, default=20)
    c.add_argument("--json", action="store_true")
    c = command("show", cmd_show, "show one run")
    c.add_argument("run")
    c.add_argument("--json", action="store_true")
    c.add_argument(
        "--follow", action="store_true", help="follow the run until it ends (like `faasci run`)"
    )
    c.add_argument("--timeout", type=float, default=3600, help="seconds to follow (default 3600)")
    c.add_argument("--timeline", action="store_true",
                   help="draw each attempt's queue wait and run time to scale")  # fmt: skip
    c = command("cancel", cmd_cancel, "cancel a run: its running stage is killed")
    c.add_argument("run")
    c = command("approve", cmd_approve, "approve the promotion a run waits for (admins)")
    c.add_argument("run")
    c = command("logs", cmd_logs, "print the logs of a run's stages")
    c.add_argument("run")
    c.add_argument("stage", nargs="?")
    c.add_argument("-f", "--follow", action="store_true",
                   help="follow the logs as the stages write them, until they end")  # fmt: skip
    c = command("cache", cmd_cache, "list or purge dependency-cache entries")
    c.add_argument("action", choices=["ls", "purge"])
    c.add_argument("--service", help="only this service's entries")
    c.add_argument("--older-than", type=float, metavar="DAYS", help="purge: unused this long")
    c.add_argument("--all", action="store_true", help="purge: every entry")
    c.add_argument("--json", action="store_true")
    c = command("audit", cmd_audit, "list the audit trail: who started, cancelled, purged what")
    c.add_argument("--since", help="an ISO 8601 time or a duration back from now: 30m, 1h, 2d")
    c.add_argument("--run", help="only the entries of this run")
    c.add_argument("--limit", type=int, default=1000, help="the newest this many (default 1000)")
    c.add_argument("--json", action="store_true")
    c = command(
        "graph",
        cmd_graph,
        "the services' dependency graph: what each depends on, and its dependents",
    )
    c.add_argument("--json", action="store_true")
    c = command("limits", cmd_limits, "a service's concurrency cap, burst and monthly budget: "
                "show them, or set them (admins)")  # fmt: skip
    c.add_argument("service")
    c.add_argument("--concurrency", type=int, metavar="N", help="stage executions at once")
    c.add_argument("--burst", type=int, metavar="N", help="at once while a burst lasts")
    c.add_argument("--burst-window", type=float, metavar="S", help="seconds a burst lasts")
    c.add_argument("--budget", type=float, metavar="AMOUNT", help="the monthly budget")
    c.add_argument("--json", action="store_true")
    c = command("secrets", cmd_secrets, "stage secrets of a repository, and the platform's")
    c.add_argument("action", choices=["put", "ls", "rotate", "show-webhook"],
                   help="put <repo> <path> KEY=VALUE...: write a stage secret (`<path>#KEY` "
                   "in a pipeline); ls <repo>: its secrets' names; rotate [NAME...]: rotate "
                   "platform secrets (default internal-signing); show-webhook: the value to "
                   "configure a git host's webhook with (local stack)")  # fmt: skip
    c.add_argument("args", nargs="*", help="the action's arguments")
    c.add_argument("--force", action="store_true", help="rotate: even inside the overlap")
    c.add_argument("--json", action="store_true")
    c = command("costs", cmd_costs, "what runs cost: usage priced by the rate card, grouped")
    c.add_argument("--by", choices=["service", "stage", "environment"], default="service")
    c.add_argument("--since", help="a date (YYYY-MM-DD) or ISO 8601 time (default: this month)")
    c.add_argument("--json", action="store_true")
    command("token", cmd_token, "print your access token (for curl: Authorization: Bearer ...)")
    c = command("invoke", cmd_invoke, "invoke a function through the gateway, print its answer")
    c.add_argument("function")
    c.add_argument("body", nargs="?", default="", help="request body (JSON)")
    c.add_argument("--async", dest="is_async", action="store_true", help="queue it (202)")
    return p


def version() -> str:
    """The installed package's version, else the checkout's pyproject.toml's."""
    from importlib import metadata

    try:
        return metadata.version("faasci")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, ValueError):
            return "unknown"


def stack_file_here() -> bool:
    """FAASCI_STACK is set, or there is a stack.yml here or above."""
    from .local.config import find_stack_file

    try:
        find_stack_file()
    except SystemExit:
        return False
    return True


def local_config() -> LocalConfig | None:
    """The local stack the CLI talks to (see the module's doc), or None when none is known."""
    if not stack_file_here():
        return None
    return LocalConfig.from_env()


def gateway_url() -> str:
    if os.environ.get("OPENFAAS_URL"):
        return os.environ["OPENFAAS_URL"].rstrip("/")
    cfg = local_config()
    return cfg.gateway_url if cfg else userconfig.DEFAULT_GATEWAY


def gateway() -> Gateway:
    return Gateway(gateway_url(), token=token)


def token() -> str:
    """The caller's OIDC access token: FAASCI_TOKEN (or OIDC_TOKEN) on a cluster, else one
    the local stack's provider issues to the local user (kept until shortly before expiry)."""
    given = os.environ.get("FAASCI_TOKEN") or os.environ.get("OIDC_TOKEN")
    if given:
        return given.strip()
    from .local import oidc

    cfg = local_config()
    if cfg is None:
        raise CommandError(
            "no token for the gateway: no local stack known here (no stack.yml here or above, "
            f"none recorded in {userconfig.path()}); set FAASCI_TOKEN to an access token of "
            "your OIDC issuer, or start the local stack (`faasci up` in the faas-ci checkout)"
        )
    try:
        return oidc.token(cfg)
    except (KeyError, OSError, RuntimeError, requests.RequestException) as e:
        raise CommandError(
            f"no token for the gateway ({e}); set FAASCI_TOKEN to an access token of your "
            "OIDC issuer, or start the local stack (`faasci up`)"
        ) from None


def cmd_token(args) -> int:
    print(token())
    return 0


def answer(resp: requests.Response) -> dict:
    """The JSON of a 2xx answer; a 4xx/5xx becomes a CommandError naming the problem."""
    try:
        body = resp.json()
    except ValueError:
        body = {"error": resp.text.strip()[:500]}
    if resp.status_code >= 400:
        raise CommandError(f"{body.get('error', body)} (HTTP {resp.status_code})")
    return body


def say(message: str) -> None:
    """A line of the stack's progress, never wrapped: people copy commands from it."""
    err.print(message, soft_wrap=True, markup=False, highlight=False)


def stack_config() -> LocalConfig:
    cfg = local_config()
    if cfg is None:
        raise CommandError(
            "no stack.yml here or above and no local stack recorded in "
            f"{userconfig.path()}: run this in the faas-ci checkout, or set FAASCI_STACK"
        )
    return cfg


def cmd_up(args) -> int:
    cfg = stack_config()
    if args.observe:  # recorded with the stack: `faasci show` links its traces
        cfg = dataclasses.replace(cfg, observe=True)
    control.up(cfg, say=say, containers=args.containers, observe=args.observe)
    try:  # so that `faasci` finds this stack from any directory
        userconfig.remember_stack(cfg)
    except OSError as e:
        say(f"(could not record the stack in {userconfig.path()}: {e})")
    return 0


def cmd_down(args) -> int:
    control.down(stack_config(), say=say)
    return 0


def cmd_status(args) -> int:
    found = control.status(stack_config())
    if args.json:
        print(json.dumps(found, indent=2))
        return 1 if found["down"] else 0
    for name, part in found["parts"].items():
        if not part.get("used", True):
            state = "not used (the gateway's own scheduler)"
        else:
            state = "up" if part["healthy"] else "running, not answering" if part["pid"] else "down"
        print(f"{name:15} {state}" + (f" (pid {part['pid']})" if part["pid"] else ""))
    fns = found["functions"]
    print(
        f"{'functions':15} {fns['ready']}/{fns['total']} ready"
        + (f"; not ready: {', '.join(fns['not_ready'])}" if fns["not_ready"] else "")
    )
    if found["down"]:
        print(f"down: {', '.join(found['down'])} (`faasci up` starts what is missing)")
    return 1 if found["down"] else 0


def cmd_run(args) -> int:
    repo = os.path.abspath(args.repo) if os.path.exists(args.repo) else args.repo
    if args.explain:
        print(explain(repo, args.ref), end="")
        return 0
    body = {"repo": repo, "trigger": "cli", **({"ref": args.ref} if args.ref else {})}
    run = answer(gateway().call("runs", body, timeout=300))
    err.print(
        f"run [bold]{run['id']}[/]: {run['service']} at {run['commit'][:12]}"
        + (" (snapshot of the working tree)" if run.get("snapshot") else ""),
        soft_wrap=True,
        highlight=False,
    )
    if args.detach:
        print(json.dumps(run, indent=2) if args.json else run["id"])
        return 0
    return watch(run["id"], args.timeout, table=args.follow, as_json=args.json)


def watch(run_id: str, timeout: float, table: bool, as_json: bool) -> int:
    """Follow a run to its end and print how it ended (why, when it failed); Ctrl-C offers
    to cancel it, or leaves it running."""
    try:
        run = follow(run_id, timeout, table=table)
    except KeyboardInterrupt:
        return interrupted(run_id)
    if as_json:
        print(json.dumps(run, indent=2))
    elif not table:  # following drew the table already
        err.print(stages_table(run))
    ending(run)
    return 0 if run["status"] == "passed" else 1


def ending(run: dict) -> None:
    """The run's outcome: where its image went; for a failed run, each failed stage's
    reason, its error tail and the command that shows its whole log."""
    for line in ([f"image: {run['image']}"] if run.get("image") else []) + delivery_lines(run):
        say(line)
    if run["status"] == "failed":
        gw = gateway()
        for stage in run["stages"]:
            if stage["status"] == "failed" and stage["attempts"]:
                for line in failure_report(run, stage, gw):
                    say(line)
    err.print(
        f"run {run['id']} [{STYLE.get(run['status'], '')}]{run['status']}[/]"
        + (f" in {run['duration_s']:.1f}s" if run.get("duration_s") else ""),
        soft_wrap=True,
        highlight=False,
    )


TAIL_LINES = 15


def failure_report(run: dict, stage: dict, gw: Gateway) -> list[str]:
    last = stage["attempts"][-1]
    spec = (run.get("pipeline") or {}).get("stages", {}).get(stage["name"]) or {}
    why = describe_failure(last, spec)
    tries = len(stage["attempts"])
    lines = [
        f"stage {stage['name']} failed: {why}" + (f" (after {tries} attempts)" if tries > 1 else "")
    ]
    if last.get("error") and last["error"] not in why:
        lines.append(f"  error: {last['error']}")
    if (scanned := last.get("scan") or {}).get("report"):  # the Trivy gate's, in S3
        lines.append(f"  scan report: s3://{scanned.get('bucket')}/{scanned['report']} "
                     f"(image {scanned['image']})")  # fmt: skip
    tail = last.get("log_tail") or log_tail(gw, run["id"], stage["name"], last["number"])
    if tail:
        shown = tail.rstrip("\n").splitlines()[-TAIL_LINES:]
        lines.append(f"  last {len(shown)} lines of its log (attempt {last['number']}):")
        lines += [f"  | {line}" for line in shown]
    lines.append(f"  see more: faasci logs {run['id']} {stage['name']}")
    return lines


def describe_failure(attempt: dict, spec: dict) -> str:
    reason = attempt.get("reason")
    if reason == "timeout":
        limit = spec.get("timeout")
        return "timed out" + (f" after {limit}s (its timeout)" if limit else "")
    if reason == "exit":
        return f"exited with code {attempt.get('exit_code')}"
    if reason == "infra":
        return "an infrastructure failure" + (
            f": {attempt['error']}" if attempt.get("error") else ""
        )
    return attempt.get("error") or reason or "failed"


def log_tail(gw: Gateway, run_id: str, stage: str, number: int, limit: int = 64 * 1024) -> str:
    """The end of an attempt's log, read as a stream (a log can be large); "" if unavailable."""
    try:
        resp = gw.session.get(
            f"{gw.url}/function/pipeline-log/{run_id}/{stage}/{number}", stream=True, timeout=30
        )
        if not resp.ok:
            return ""
        kept, size = collections.deque(), 0
        for chunk in resp.iter_content(64 * 1024):
            kept.append(chunk)
            size += len(chunk)
            while size - len(kept[0]) >= limit:
                size -= len(kept.popleft())
        return b"".join(kept)[-limit:].decode(errors="replace")
    except requests.RequestException:
        return ""


def interrupted(run_id: str) -> int:
    """Ctrl-C while following a run: ask whether to cancel it (on a terminal), else leave it
    running, and say how to follow or cancel it later."""
    cancel = False
    if sys.stdin.isatty():
        try:
            err.print()
            cancel = input("cancel the run? [y/N] ").strip().lower() in ("y", "yes")
        except (KeyboardInterrupt, EOFError):
            err.print()
    if cancel:
        try:
            done = answer(gateway().call("runs", path=f"{run_id}/cancel"))
            say(f"run {run_id} {done['status']}; its logs: faasci logs {run_id}")
            return 130
        except (CommandError, requests.RequestException) as e:
            say(f"could not cancel run {run_id}: {e}")
    say(f"detached; run {run_id} goes on.")
    say(f"  follow it: faasci show {run_id} --follow")
    say(f"  cancel it: faasci cancel {run_id}")
    return 130


def explain(repo: str, ref: str | None) -> str:
    """The pipeline a run of `repo` at `ref` would follow, as a pipeline file with the reasons
    as comments. Resolved here, as the runs function would (the CLI runs next to the
    repository), with a snapshot store of its own that is thrown away."""
    with tempfile.TemporaryDirectory(prefix="faasci-explain-") as scratch:
        try:
            resolved = git.resolve(repo, ref, Path(scratch) / "snapshots.git", Path(scratch))
            spec, why = pipeline.explain(
                resolved.pipeline_text, resolved.files, resolved.name, resolved.read
            )
        except UserError as e:
            raise CommandError(e.message) from None
        except git.GitError as e:
            raise CommandError(str(e)) from None
    where = f"{repo} at {resolved.commit[:12]}" + (
        " (a snapshot of the working tree)" if resolved.snapshot else f" ({resolved.ref})"
    )
    reasons = "".join(f"#   {line}\n" for line in why)
    return f"# The pipeline of {where}; why:\n{reasons}{spec.to_yaml()}"


def follow(run_id: str, timeout: float, table: bool) -> dict:
    """Poll a run until it ends, showing which stage runs and for how long: a live line (and
    with `table`, every stage's table) on a terminal, else a plain line per change."""
    gw, deadline = gateway(), time.monotonic() + timeout
    progress = Progress(table=table)
    with Live(
        progress,
        console=err,
        transient=not table,
        auto_refresh=err.is_terminal,
        refresh_per_second=4,
        redirect_stderr=False,
        redirect_stdout=False,
    ) as view:
        while True:
            run = answer(gw.call("runs", method="GET", path=run_id))
            progress.update(run)
            if run["status"] in ("passed", "failed", "cancelled"):
                progress.done = True
                view.refresh()
                return run
            if not err.is_terminal:
                view.refresh()
            if time.monotonic() > deadline:
                raise CommandError(
                    f"run {run_id} still {run['status']} after {timeout:.0f}s; "
                    f"follow it: faasci show {run_id} --follow"
                )
            time.sleep(0.5)


def _elapsed(since: str | None) -> float | None:
    if not since:
        return None
    started = datetime.fromisoformat(since.replace("Z", "+00:00"))
    return max((datetime.now(UTC) - started).total_seconds(), 0.0)


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    minutes, seconds = divmod(int(s), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """What a followed run is doing. On a terminal, rendered live (a spinner with the current
    stage, its elapsed time and the run's); elsewhere, a plain line to stderr at each change
    of a stage, and every 30 s while one runs."""

    QUIET_S = 30

    def __init__(self, table: bool):
        self.table, self.run, self.done = table, None, False
        self.seen: dict[str, tuple] = {}
        self.last_line = time.monotonic()
        self.spinner = Spinner("dots")

    def update(self, run: dict) -> None:
        self.run = run
        if not err.is_terminal:
            self.plain_lines(run)

    def current(self, run: dict) -> dict | None:
        for stage in run["stages"]:
            if stage["status"] in ("running", "queued"):
                return stage
        return None

    def line(self) -> str:
        run = self.run
        overall = f"overall {_seconds(_elapsed(run.get('created_at')))}"
        stage = self.current(run)
        if stage is None:
            return f"run {run['status']} · {overall}"
        names = [s["name"] for s in run["stages"]]
        place = f"stage {names.index(stage['name']) + 1}/{len(names)}"
        attempts = stage["attempts"]
        if stage["status"] == "running" and attempts:
            last = attempts[-1]
            retry = f" (attempt {last['number']})" if last["number"] > 1 else ""
            return (
                f"{stage['name']} running {_seconds(_elapsed(last.get('started_at')))}{retry}"
                f" · {place} · {overall}"
            )
        if stage.get("retry_at"):
            left = max((datetime.fromisoformat(stage["retry_at"].replace("Z", "+00:00"))
                        - datetime.now(UTC)).total_seconds(), 0.0)  # fmt: skip
            why = describe_failure(attempts[-1], {}) if attempts else "failed"
            return (
                f"{stage['name']} {why}; attempt {len(attempts) + 1} in {_seconds(left)}"
                f" · {place} · {overall}"
            )
        return f"{stage['name']} queued · {place} · {overall}"

    def plain_lines(self, run: dict) -> None:
        """One line per stage change (and a reminder while a stage runs on), for logs and CI."""
        changed = False
        for stage in run["stages"]:
            last = stage["attempts"][-1] if stage["attempts"] else {}
            state = (stage["status"], last.get("number"), last.get("status"))
            if self.seen.get(stage["name"]) == state:
                continue
            self.seen[stage["name"]] = state
            if stage["status"] in ("pending",) or (stage["status"] == "queued" and not last):
                continue
            changed = True
            if stage["status"] in ("passed", "failed", "cancelled", "skipped"):
                took = stage.get("duration_s") or last.get("duration_s")
                said = f"{stage['name']} {stage['status']}" + (
                    f" in {_seconds(took)}" if took else ""
                )
                if stage["status"] == "failed" and last:
                    said += f": {describe_failure(last, {})}"
                self.say(said)
            elif stage["status"] == "running" or stage["status"] == "queued":
                self.say(self.line())
        quiet = time.monotonic() - self.last_line >= self.QUIET_S
        if not changed and quiet and self.current(run):
            self.say(self.line())

    def say(self, line: str) -> None:
        overall = _seconds(_elapsed(self.run.get("created_at")))
        say(f"[{overall:>7}] {line}")
        self.last_line = time.monotonic()

    def __rich__(self):
        if self.run is None:
            return Text("")
        parts = []
        if self.table:
            parts.append(stages_table(self.run))
        if not self.done and err.is_terminal:
            self.spinner.update(text=Text(self.line()))
            parts.append(self.spinner)
        return Group(*parts)


def stages_table(run: dict) -> Table:
    table = Table(
        title=f"{run['service']} {run['ref']} {run['commit'][:12]}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("stage", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("exit", justify="right")
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for stage in run["stages"]:
        last = stage["attempts"][-1] if stage["attempts"] else {}
        duration = stage.get("duration_s") or last.get("duration_s")
        if stage["status"] == "running":
            duration = _elapsed(last.get("started_at"))
        table.add_row(
            stage["name"],
            f"[{STYLE.get(stage['status'], '')}]{stage['status']}[/]",
            str(len(stage["attempts"])),
            "" if last.get("exit_code") is None else str(last["exit_code"]),
            _seconds(duration) if duration else "",
            describe_failure(last, {}) if stage["status"] == "failed" and last else "",
        )
    return table


def cmd_runs(args) -> int:
    runs = answer(gateway().call("runs", method="GET", query={"limit": args.limit}))["runs"]
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    console = Console()
    console.print(runs_table(runs, console.width))
    return 0


def runs_table(runs: list[dict], width: int) -> Table:
    """Recent runs, fitting `width` columns: run ids are never cut; on a narrow terminal the
    trigger and commit columns go first, and what is left folds."""
    id_width = max([len(r["id"]) for r in runs] + [3])
    columns = ["run", "service", "ref", "commit", "trigger", "status", "duration"]
    if width < 100:
        columns.remove("trigger")
    if width < 90:
        columns.remove("commit")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in columns:
        if name == "run":
            table.add_column(name, no_wrap=True, min_width=id_width)
        elif name in ("status", "duration", "commit"):
            table.add_column(name, no_wrap=True, justify="right" if name == "duration" else "left")
        else:
            table.add_column(name, overflow="fold")
    for run in runs:
        values = {
            "run": run["id"],
            "service": run["service"],
            "ref": run["ref"],
            "commit": run["commit"][:12],
            "trigger": run["trigger"],
            "status": f"[{STYLE.get(run['status'], '')}]{run['status']}[/]",
            "duration": _seconds(run["duration_s"]) if run.get("duration_s") else "",
        }
        table.add_row(*(values[c] for c in columns))
    return table


def cmd_show(args) -> int:
    if args.follow:
        return watch(args.run, args.timeout, table=True, as_json=args.json)
    run = answer(gateway().call("runs", method="GET", path=args.run))
    if args.json:
        print(json.dumps(run, indent=2))
        return 0
    print(f"run {run['id']}  status: {run['status']}  trigger: {run['trigger']}")
    print(f"repo: {run['repo']}")
    if line := trace_line(run):
        print(line)
    if run.get("image"):  # what the build stage pushed, by digest
        print(f"image: {run['image']}")
    for line in delivery_lines(run):
        print(line)
    approval = run.get("approval") or {}
    if approval and not approval.get("by") and run["status"] == "running":
        print(f"waiting for an admin's approval to promote to {approval['environment']}: "
              f"faasci approve {run['id']}")  # fmt: skip
    Console().print(stages_table(run))
    if args.timeline:
        from . import timeline

        Console().print(timeline.render(timeline.build(run), Console().width))
    if run["status"] == "failed":
        gw = gateway()
        for stage in run["stages"]:
            if stage["status"] == "failed" and stage["attempts"]:
                print("\n".join(failure_report(run, stage, gw)))
    return 0


def trace_line(run: dict) -> str | None:
    """`trace: <trace id>`, and its page in Jaeger on the next line (within 80 columns) when
    the local stack observes."""
    from . import tracing
    from .local.observe import trace_link

    trace_id = tracing.trace_id_of(run.get("traceparent"))
    if trace_id is None:
        return None
    link = trace_link(local_config(), trace_id)
    return f"trace: {trace_id}" + (f"\n  {link}" if link else "")


def delivery_lines(run: dict) -> list[str]:
    """Where the run's image went: the environment it was promoted to, the target it was
    rolled out on (from the last attempts' records)."""
    last = {s["name"]: s["attempts"][-1] for s in run["stages"] if s["attempts"]}
    lines = []
    promotion = (last.get("promote") or {}).get("promotion") or {}
    if promotion.get("environment"):
        change = (f"commit {promotion['commit'][:12]}" if promotion.get("commit")
                  else "already there, no commit")  # fmt: skip
        lines.append(f"promoted: {promotion['environment']} ({promotion['file']} in "
                     f"{promotion['repository']}, {change})")  # fmt: skip
    deployment = (last.get("deploy") or {}).get("deployment") or {}
    if deployment.get("target"):
        name = deployment.get("function") or deployment.get("application")
        if deployment.get("rolled_back_to"):
            state = f"unhealthy, rolled back to {deployment['rolled_back_to']}"
        elif deployment.get("healthy_after_s") is not None:
            state = f"healthy after {deployment['healthy_after_s']} s"
        else:
            state = "not healthy"
        lines.append(f"deployed: {deployment['target']} {name}, {state}")
    return lines


def cmd_costs(args) -> int:
    from .costs import costs_table

    query = {"by": args.by, **({"since": args.since} if args.since else {})}
    found = answer(gateway().call("runs", method="GET", path="costs", query=query))
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    Console().print(costs_table(found))
    return 0


def cmd_cancel(args) -> int:
    run = answer(gateway().call("runs", path=f"{args.run}/cancel"))
    err.print(f"run {run['id']} {run['status']}")
    return 0


def cmd_approve(args) -> int:
    run = answer(gateway().call("runs", path=f"{args.run}/approve"))
    approval = run.get("approval") or {}
    err.print(f"run {run['id']}: promotion to {approval.get('environment')} approved by "
              f"{approval.get('by')}")  # fmt: skip
    return 0


def cmd_logs(args) -> int:
    gw = gateway()
    run = answer(gw.call("runs", method="GET", path=args.run))
    names = [s["name"] for s in run["stages"] if args.stage in (None, s["name"])]
    if not names:
        raise CommandError(f"run {args.run} has no stage {args.stage!r}")
    for name in names:
        number = 1
        while True:
            stage = next(s for s in run["stages"] if s["name"] == name)
            if len(stage["attempts"]) < number:  # not (yet) run
                ended = stage["status"] in ("passed", "failed", "skipped", "cancelled")
                if not args.follow or ended or run["status"] in ("passed", "failed", "cancelled"):
                    break
                time.sleep(1)
                run = answer(gw.call("runs", method="GET", path=args.run))
                continue
            attempt = stage["attempts"][number - 1]
            print(f"==> {name} attempt {number} ({attempt['status']}) <==", flush=True)
            print_log(gw, run["id"], name, number, args.follow)
            if args.follow:  # its status now, and whether a retry follows
                run = answer(gw.call("runs", method="GET", path=args.run))
            number += 1
    return 0


def print_log(gw: Gateway, run_id: str, stage: str, number: int, follow: bool) -> None:
    """Copy an attempt's log to stdout as it arrives (following: until the attempt ends)."""
    resp = gw.session.get(f"{gw.url}/function/pipeline-log/{run_id}/{stage}/{number}",
                          params={"follow": "1"} if follow else None, stream=True,
                          timeout=(10, None if follow else 300))  # fmt: skip
    with resp:
        if not resp.ok:
            print(f"(log unavailable: HTTP {resp.status_code})", flush=True)
            return
        last = b"\n"
        for block in resp.iter_content(64 * 1024):
            if block:
                sys.stdout.buffer.write(block)
                sys.stdout.buffer.flush()
                last = block[-1:]
        if last != b"\n":
            print(flush=True)


def cmd_cache(args) -> int:
    gw = gateway()
    if args.action == "ls":
        query = {"service": args.service} if args.service else None
        entries = answer(gw.call("cache-invalidator", method="GET", query=query))["entries"]
        if args.json:
            print(json.dumps(entries, indent=2))
            return 0
        table = Table("service", "key", "size", "created", "last used")
        for e in entries:
            table.add_row(e["service"], e["key"][:12], f"{e['size'] / 1e6:.1f} MB",
                          e["created"][:19], e["last_used"][:19])  # fmt: skip
        Console().print(table)
        return 0
    body = {"all": args.all}
    if args.service:
        body["service"] = args.service
    if args.older_than is not None:
        body["older_than_days"] = args.older_than
    removed = answer(gw.call("cache-invalidator", body, path="purge"))["removed"]
    print(json.dumps(removed, indent=2) if args.json else f"removed {len(removed)} entries")
    return 0


def cmd_audit(args) -> int:
    query = {"limit": args.limit, **({"since": args.since} if args.since else {}),
             **({"run": args.run} if args.run else {})}  # fmt: skip
    entries = answer(gateway().call("runs", method="GET", path="audit", query=query))["entries"]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    table = Table("time", "actor", "action", "repo", "ref", "commit", "run", "detail")
    for e in entries:
        detail = " ".join(f"{k}={v}" for k, v in (e.get("detail") or {}).items())
        table.add_row(e["time"][:19].replace("T", " "), e["actor"], e["action"],
                      e.get("repo") or "", e.get("ref") or "", (e.get("commit") or "")[:12],
                      e.get("run") or "", detail)  # fmt: skip
    Console().print(table)
    return 0


def cmd_limits(args) -> int:
    """Show a service's limits; with options, set those first (PUT: the others are kept)."""
    body = {name: value for name, value in (
        ("concurrency", args.concurrency), ("burst", args.burst),
        ("burst_window_s", args.burst_window), ("monthly_budget", args.budget),
    ) if value is not None}  # fmt: skip
    path = f"limits/{args.service}"
    gw = gateway()
    found = answer(gw.call("runs", body, path=path, method="PUT") if body
                   else gw.call("runs", method="GET", path=path))  # fmt: skip
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    set_here = found.get("overrides") or {}

    def line(name: str, label: str, unit: str = "") -> str:
        value = found.get(name)
        shown = "none" if value is None else f"{value:g}{unit}"
        return f"{label:<15} {shown}{'' if name in set_here else '  (default)'}"

    print(f"service         {found['service']}")
    print(line("concurrency", "concurrency"))
    print(line("burst", "burst"))
    print(line("burst_window_s", "burst window", " s"))
    print(line("monthly_budget", "monthly budget"))
    use = found.get("usage") or {}
    if use.get("scope") not in (None, "off"):
        print(f"now             {use['running']} running, {use['waiting']} waiting, limit "
              f"{use['limit']} (capped per {use['scope']})")  # fmt: skip
    return 0


def cmd_graph(args) -> int:
    from .downstream import render

    graph = answer(gateway().call("runs", method="GET", path="graph"))
    print(json.dumps(graph, indent=2) if args.json else render(graph))
    return 0


def cmd_secrets(args) -> int:
    from .cache import namespace_of

    gw, rest = gateway(), list(args.args)

    def repo_namespace(repo: str) -> str:  # as the runs function names the repository
        return namespace_of(os.path.abspath(repo) if os.path.exists(repo) else repo)

    if args.action == "put":
        if len(rest) < 3 or not all("=" in kv for kv in rest[2:]):
            raise CommandError("usage: faasci secrets put <repo> <path> KEY=VALUE...")
        values = dict(kv.split("=", 1) for kv in rest[2:])
        path = f"repos/{repo_namespace(rest[0])}/{rest[1]}"
        done = answer(gw.call("secrets", values, path=path, method="PUT"))
        print(
            json.dumps(done, indent=2)
            if args.json
            else f"wrote {', '.join(done['keys'])} to {rest[1]} (version {done['version']})"
        )
    elif args.action == "ls":
        if len(rest) != 1:
            raise CommandError("usage: faasci secrets ls <repo>")
        found = answer(gw.call("secrets", method="GET", path=f"repos/{repo_namespace(rest[0])}"))
        if args.json:
            print(json.dumps(found, indent=2))
        for path, keys in ({} if args.json else found["secrets"]).items():
            print(f"{path}: {', '.join(keys)}")
    elif args.action == "rotate":
        body = {"names": rest or ["internal-signing"], "force": args.force}
        rotated = answer(gw.call("secrets", body, path="rotate"))["rotated"]
        for r in rotated:
            until = r["previous_until"]
            print(
                json.dumps(r)
                if args.json
                else f"rotated {r['name']}; its previous value is accepted until {until}"
            )
    else:  # show-webhook: read with the local stack's own OpenBao root token
        from .local import openbao

        values = openbao.read_platform(stack_config(), "webhook-secret")
        print(values[0])
        if len(values) > 1:
            err.print("(the previous value is still accepted during its overlap window)")
    return 0


def cmd_invoke(args) -> int:
    gw = gateway()
    body = args.body.encode()
    if args.is_async:
        resp = gw.session.post(f"{gw.url}/async-function/{args.function}", data=body)
    else:
        resp = gw.call(args.function, body, timeout=3600)
    sys.stdout.write(resp.text if resp.text.endswith("\n") else resp.text + "\n")
    return 0 if resp.status_code < 400 else 1


if __name__ == "__main__":
    sys.exit(main())
