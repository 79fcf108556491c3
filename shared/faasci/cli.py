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
    c = command("audit", cmd_audit, "list the audit trail: who started, cancelled, purged what")
    c.add_argument("--since", help="an ISO 8601 time or a duration back from now: 30m, 1h, 2d")
    c.add_argument("--run", help="only the entries of this run")
    c.add_argument("--limit", type=int, default=1000, help="the newest this many (default 1000)")
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
    command("token", cmd_token, "print your access token (for curl: Authorization: Bearer ...)")
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
    return Gateway(gateway_url(), token=token)


def token() -> str:
    """The caller's OIDC access token: FAASCI_TOKEN (or OIDC_TOKEN) on a cluster, else one
    the local stack's provider issues to the local user (kept until shortly before expiry)."""
    given = os.environ.get("FAASCI_TOKEN") or os.environ.get("OIDC_TOKEN")
    if given:
        return given.strip()
    from .local import oidc

    try:
        return oidc.token(LocalConfig.from_env())
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

        values = openbao.read_platform(LocalConfig.from_env(), "webhook-secret")
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
