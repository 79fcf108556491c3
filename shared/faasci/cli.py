"""The `faasci` command: the local stack, runs, logs and single invocations.

Everything but `up` and `down` talks HTTP to the gateway (OPENFAAS_URL, else stack.yml's
provider.gateway), so the same commands work against a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import requests
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import git, pipeline
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
    try:
        return args.command(args) or 0
    except CommandError as e:
        err.print(f"[red]error:[/] {e}")
        return 2
    except requests.ConnectionError:
        err.print(
            f"[red]error:[/] the gateway at {gateway_url()} is not reachable "
            "(is the stack up? `faasci up`)"
        )
        return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="faasci", description=__doc__.splitlines()[0])
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
    command("down", cmd_down, "stop the local stack, keeping its data")
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
    c.add_argument("--follow", action="store_true", help="show live progress per stage")
    c.add_argument("--json", action="store_true", help="print the final run record as JSON")
    c.add_argument("--detach", action="store_true", help="start the run and return at once")
    c.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    c = command("runs", cmd_runs, "list recent runs")
    c.add_argument("--limit", type=int, default=20)
    c.add_argument("--json", action="store_true")
    c = command("show", cmd_show, "show one run")
    c.add_argument("run")
    c.add_argument("--json", action="store_true")
    c = command("cancel", cmd_cancel, "cancel a run: its running stage is killed")
    c.add_argument("run")
    c = command("logs", cmd_logs, "print the logs of a run's stages")
    c.add_argument("run")
    c.add_argument("stage", nargs="?")
    c = command("cache", cmd_cache, "list or purge dependency-cache entries")
    c.add_argument("action", choices=["ls", "purge"])
    c.add_argument("--service", help="only this service's entries")
    c.add_argument("--older-than", type=float, metavar="DAYS", help="purge: unused this long")
    c.add_argument("--all", action="store_true", help="purge: every entry")
    c.add_argument("--json", action="store_true")
    c = command("invoke", cmd_invoke, "invoke a function through the gateway, print its answer")
    c.add_argument("function")
    c.add_argument("body", nargs="?", default="", help="request body (JSON)")
    c.add_argument("--async", dest="is_async", action="store_true", help="queue it (202)")
    return p


def gateway_url() -> str:
    if os.environ.get("OPENFAAS_URL"):
        return os.environ["OPENFAAS_URL"].rstrip("/")
    return LocalConfig.from_env().gateway_url


def gateway() -> Gateway:
    return Gateway(gateway_url())


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


def cmd_up(args) -> int:
    control.up(LocalConfig.from_env(), say=say, containers=args.containers)
    return 0


def cmd_down(args) -> int:
    control.down(LocalConfig.from_env(), say=say)
    return 0


def cmd_run(args) -> int:
    repo = os.path.abspath(args.repo) if os.path.exists(args.repo) else args.repo
    if args.explain:
        print(explain(repo, args.ref), end="")
        return 0
    body = {"repo": repo, "trigger": "cli", **({"ref": args.ref} if args.ref else {})}
    run = answer(gateway().call("runs", body, timeout=300))
    err.print(
        f"run [bold]{run['id']}[/]: {run['service']} at {run['commit'][:12]}"
        + (" (snapshot of the working tree)" if run.get("snapshot") else "")
    )
    if args.detach:
        print(json.dumps(run, indent=2) if args.json else run["id"])
        return 0
    run = follow(run["id"], args.timeout, live=args.follow)
    if args.json:
        print(json.dumps(run, indent=2))
    elif not args.follow:  # following drew the table already
        err.print(stages_table(run))
    err.print(
        f"run {run['id']} [{STYLE.get(run['status'], '')}]{run['status']}[/]"
        + (f" in {run['duration_s']:.1f}s" if run.get("duration_s") else "")
    )
    return 0 if run["status"] == "passed" else 1


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


def follow(run_id: str, timeout: float, live: bool) -> dict:
    gw, deadline = gateway(), time.monotonic() + timeout
    with Live(console=err, transient=False, auto_refresh=False, redirect_stderr=False) as view:
        while True:
            run = answer(gw.call("runs", method="GET", path=run_id))
            if live:
                view.update(stages_table(run), refresh=True)
            if run["status"] in ("passed", "failed", "cancelled"):
                return run
            if time.monotonic() > deadline:
                raise CommandError(f"run {run_id} still {run['status']} after {timeout:.0f}s")
            time.sleep(0.5)


def stages_table(run: dict) -> Table:
    table = Table(title=f"{run['service']} {run['ref']} {run['commit'][:12]}", title_justify="left")
    for column in ("stage", "status", "attempts", "exit", "duration"):
        table.add_column(column)
    for stage in run["stages"]:
        last = stage["attempts"][-1] if stage["attempts"] else {}
        duration = stage.get("duration_s") or last.get("duration_s")
        table.add_row(
            stage["name"],
            f"[{STYLE.get(stage['status'], '')}]{stage['status']}[/]",
            str(len(stage["attempts"])),
            "" if last.get("exit_code") is None else str(last["exit_code"]),
            f"{duration:.1f}s" if duration else "",
        )
    return table


def cmd_runs(args) -> int:
    runs = answer(gateway().call("runs", method="GET", query={"limit": args.limit}))["runs"]
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    table = Table("run", "service", "ref", "commit", "trigger", "status", "duration")
    for run in runs:
        table.add_row(
            run["id"],
            run["service"],
            run["ref"],
            run["commit"][:12],
            run["trigger"],
            f"[{STYLE.get(run['status'], '')}]{run['status']}[/]",
            f"{run['duration_s']:.1f}s" if run.get("duration_s") else "",
        )
    Console().print(table)
    return 0


def cmd_show(args) -> int:
    run = answer(gateway().call("runs", method="GET", path=args.run))
    if args.json:
        print(json.dumps(run, indent=2))
    else:
        Console().print(stages_table(run))
        print(f"status: {run['status']}  trigger: {run['trigger']}  repo: {run['repo']}")
    return 0


def cmd_cancel(args) -> int:
    run = answer(gateway().call("runs", path=f"{args.run}/cancel"))
    err.print(f"run {run['id']} {run['status']}")
    return 0


def cmd_logs(args) -> int:
    gw = gateway()
    run = answer(gw.call("runs", method="GET", path=args.run))
    stages = [s for s in run["stages"] if args.stage in (None, s["name"])]
    if not stages:
        raise CommandError(f"run {args.run} has no stage {args.stage!r}")
    for stage in stages:
        for attempt in stage["attempts"]:
            resp = gw.call(
                "pipeline-log",
                method="GET",
                path=f"{run['id']}/{stage['name']}/{attempt['number']}",
            )
            print(f"==> {stage['name']} attempt {attempt['number']} ({attempt['status']}) <==")
            print(resp.text if resp.ok else f"(log unavailable: HTTP {resp.status_code})")
    return 0


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
