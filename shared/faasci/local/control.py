"""`faasci up` and `faasci down`: start the local stack once, stop everything it started."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from dataclasses import replace

import requests

from ..objects import ObjectStore
from ..settings import Settings
from . import processes, services
from .config import LocalConfig
from .observe import parts as observe_parts
from .observe import start as observe_start
from .provider import DRAIN_S, kill_stale

# Secrets the stack can make for itself, and those it leaves empty for people to fill in
# (an empty Slack secret means "not configured"); any other secret must be provided.
# basic-auth-user and basic-auth-password (OpenFaaS's names) guard the gateway's /system API.
GENERATED_SECRETS = ("s3-access-key", "s3-secret-key", "basic-auth-password",
                     "nats-token")  # fmt: skip
EMPTY_SECRETS = ("slack-webhook-url", "slack-bot-token")
FIXED_SECRETS = {"basic-auth-user": "admin"}
DERIVED_SECRETS = {"openfaas-password": "basic-auth-password"}  # a copy of another's value


def client_settings(cfg: LocalConfig) -> Settings:
    """Settings for talking to this stack from outside a function (the CLI, tests)."""
    return replace(
        Settings(),
        gateway_url=cfg.gateway_url,
        public_url=cfg.gateway_url,
        nats_url=cfg.nats_url,
        s3_endpoint=cfg.s3_url,
        secrets_dir=cfg.secrets_dir,
        workdir=cfg.workdir,
        snapshots_dir=cfg.data / "snapshots.git",
    )


def gateway_healthy(cfg: LocalConfig) -> bool:
    try:
        return requests.get(f"{cfg.gateway_url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def system_auth(cfg: LocalConfig) -> tuple[str, str] | None:
    """The gateway's basic-auth credentials, for its /system API."""
    from .openfaas_api import credentials

    return credentials(cfg.secrets_dir)


def functions_ready(cfg: LocalConfig) -> bool:
    listed = requests.get(
        f"{cfg.gateway_url}/system/functions", auth=system_auth(cfg), timeout=5
    ).json()
    return all(fn["availableReplicas"] >= 1 for fn in listed)


def ensure_secrets(cfg: LocalConfig) -> None:
    cfg.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (*GENERATED_SECRETS, *EMPTY_SECRETS, *FIXED_SECRETS):
        value = secrets.token_urlsafe(24) if name in GENERATED_SECRETS else ""
        try:  # created 0600 from the start: never readable by others, not even briefly
            fd = os.open(cfg.secrets_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(FIXED_SECRETS.get(name, value))
    # The deploy stage calls the gateway's API (faasci.rollout) with its admin password,
    # under the name OpenFaaS's docs give it for functions (none may list basic-auth-*).
    for name, source in DERIVED_SECRETS.items():
        with contextlib.suppress(FileExistsError):
            fd = os.open(cfg.secrets_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write((cfg.secrets_dir / source).read_text())


def up(cfg: LocalConfig, say=print, containers: bool = False, observe: bool = False) -> bool:
    """Start whatever part of the stack is not running (or not answering): False when every
    part was up already. A dead NATS, S3 or registry under a live gateway is started and
    the gateway is left alone (its functions reconnect); a dead gateway is replaced, with
    whatever function processes and commands it left behind. With `containers`, every
    function's image is built and run as a container (see containers.py). With `observe`,
    Jaeger and Prometheus run beside it (observe.py) and the functions export to them."""
    if containers:
        cfg = replace(cfg, containers=True)
    if observe:
        cfg = replace(cfg, observe=True)
    before = status(cfg)
    # Functions that are not ready are the provider's to restart, not up's.
    if not [part for part in before["down"] if part != "functions"]:
        say(f"faas-ci is already up: gateway {cfg.gateway_url}")
        if before["down"]:
            say(not_ready_report(cfg))
        return False
    for folder in (cfg.data, cfg.logs, cfg.run, cfg.workdir):
        folder.mkdir(parents=True, exist_ok=True)
    ensure_secrets(cfg)
    env = {**os.environ, **cfg.env()}
    settings = client_settings(cfg)
    services.write_s3_identities(
        cfg, settings.secret("s3-access-key"), settings.secret("s3-secret-key")
    )
    services.write_nats_config(cfg, settings.nats_user, settings.secret("nats-token"))
    parts = before["parts"]
    for name in ("nats", "s3", "registry", "git", "oidc"):  # alive but not answering: replaced
        if parts[name]["pid"] and not parts[name]["healthy"]:
            say(f"{name} (pid {parts[name]['pid']}) is not answering: restarting it")
            processes.stop(cfg.run, name)
    if services.start_nats(cfg, env):
        say(f"NATS (JetStream) on {cfg.nats_url}")
    if services.start_s3(cfg, env):
        say(f"S3 (SeaweedFS) on {cfg.s3_url}")
    if services.start_registry(cfg, env):  # where the build stage pushes images
        say(f"image registry (Distribution) on {cfg.registry}")
    if services.start_git(cfg, env):  # the environment repository promotions push to
        say(f"environment repository (git daemon) at {cfg.environments_repository}")
    start_engine(cfg, say)
    ensure_scan_db(cfg, say)
    from . import oidc  # before the functions (they fetch its keys) and the CLI's token

    if oidc.start_oidc(cfg, env):
        say(f"OIDC provider (oidc-provider) on {cfg.oidc_issuer}")
    # Before the functions: they log in with the AppRole ids it writes to the secrets folder.
    from . import openbao

    if openbao.start(cfg, env):  # unsealed again when it runs already
        say(f"Vault (OpenBao) on {cfg.vault_url}")
    store = ObjectStore(settings)
    processes.wait_until(lambda: store.ensure_bucket() is None, 60, "the S3 bucket")
    observe_start(cfg, env, say)  # before the functions, which export to them
    connector = services.cron_connector_argv()
    if parts["gateway"]["healthy"]:
        # The gateway and its functions keep running (and their stages with them): they
        # reconnect to NATS by themselves and reach S3 per request.
        try:
            processes.wait_until(lambda: functions_ready(cfg), 60, "the functions")
        except TimeoutError:  # the provider keeps restarting them; `faasci status` follows
            say(not_ready_report(cfg))
        say(f"gateway on {cfg.gateway_url} (kept running)")
    else:
        start_gateway(cfg, env, say, connector)
    if connector and services.start_cron_connector(cfg, env, connector):
        say(f"schedules: OpenFaaS cron-connector ({connector[0]})")
    elif not connector:
        say("schedules: the gateway's own scheduler (no cron-connector in OPENFAAS_BIN or PATH)")
    return True


def start_engine(cfg: LocalConfig, say) -> None:
    """The container engine build stages and `image:` stages use (DOCKER_HOST), when Podman
    is installed (its images stay on disk across `down`), with the offline base image the
    example's Dockerfile starts from (made once). Not fatal: only those stages need it, and
    they fail as `infra` without it."""
    from .engine import Engine, EngineError

    engine = Engine.for_stack(cfg)
    if not shutil.which("podman"):
        say("container engine: podman is not installed (./scripts/install installs it)")
        return
    was_running = engine.running()
    try:
        engine.start()
    except EngineError as e:
        say(f"container engine: did not start: {e}")
        return
    if not was_running:
        say(f"container engine (Podman) at {engine.docker_host}")
    try:
        engine.ensure_base_image(say)
    except EngineError as e:
        say(f"container engine: no base image: {e}")


def ensure_scan_db(cfg: LocalConfig, say) -> None:
    """An empty, valid Trivy database for the build stage's gate (it cannot be downloaded
    here), unless one is there. Not fatal: without it, scans fail as `infra`."""
    from .. import scan

    try:
        if scan.ensure_offline_db(cfg.trivy_cache):
            say(f"Trivy: an empty offline vulnerability database in {cfg.trivy_cache}")
    except scan.ScanError as e:
        say(f"Trivy: no offline database: {e}")


def start_gateway(cfg: LocalConfig, env: dict[str, str], say, connector) -> None:
    if cfg.containers:  # before the gateway: a cold build takes longer than its start
        from .containers import build_images  # the docker SDK is needed for this mode only

        build_images(cfg, say)
    processes.stop(cfg.run, "gateway")  # a gateway that is alive but unhealthy
    # What a gateway killed hard left behind: the new one replaces it too (provider.py), but
    # this also covers a stack started from an older checkout.
    if killed := kill_stale(cfg):
        say(f"killed {killed} function processes a dead gateway left behind")
    processes.start(
        cfg.run,
        "gateway",
        [sys.executable, "-m", "faasci.local.gateway"],
        cfg.logs / "gateway.log",
        {**env, "FAASCI_BUILTIN_CRON": "0" if connector else "1"},
    )
    try:
        processes.wait_until(
            lambda: gateway_healthy(cfg) and functions_ready(cfg), 90, "the gateway and functions"
        )
    except TimeoutError:
        say(not_ready_report(cfg))
        processes.stop(cfg.run, "gateway")
        raise SystemExit("faas-ci did not come up; NATS and S3 are left running") from None
    say(f"gateway on {cfg.gateway_url}; logs in {cfg.logs}")
    if cfg.containers:
        say("functions: containers of their images, behind OpenFaaS's of-watchdog")
    else:  # of-watchdog binds its metrics port 8081 unconditionally: one per network namespace
        say("functions: processes of the template's server, without of-watchdog "
            "(faasci up --containers runs each behind it)")  # fmt: skip
    say(f"faas-cli login --gateway {cfg.gateway_url} --username admin --password-stdin "
        f"< {cfg.secrets_dir / 'basic-auth-password'}")  # fmt: skip
    say("the webhook secret to configure a git host with: faasci secrets show-webhook")


def _probe(check) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def status(cfg: LocalConfig) -> dict:
    """Each part's pid and health (its process alive and its own health probe answering),
    the functions' readiness, and `down`: the parts that are not up (empty when all are)."""
    from . import oidc, openbao

    bao = openbao.OpenBao.for_stack(cfg)
    probes = {
        "nats": lambda: services.nats_ready(cfg),
        "s3": lambda: services.s3_ready(cfg),
        "registry": lambda: services.registry_ready(cfg),
        "git": lambda: services.git_ready(cfg),
        "vault": bao.active,
        "oidc": lambda: oidc.ready(cfg),
        "gateway": lambda: gateway_healthy(cfg),
    }
    parts = {}
    for name, probe in probes.items():
        pid = processes.pid_of(cfg.run, name)
        parts[name] = {"pid": pid, "healthy": bool(pid) and _probe(probe)}
    connector = services.cron_connector_argv()
    pid = processes.pid_of(cfg.run, "cron-connector")
    parts["cron-connector"] = {"pid": pid, "healthy": bool(pid), "used": bool(connector)}
    parts.update(observe_parts(cfg))  # Jaeger and Prometheus, when the stack observes
    functions = {"ready": 0, "total": 0, "not_ready": []}
    if parts["gateway"]["healthy"]:
        try:
            listed = requests.get(
                f"{cfg.gateway_url}/system/functions", auth=system_auth(cfg), timeout=5
            ).json()
            functions["total"] = len(listed)
            functions["not_ready"] = [f["name"] for f in listed if f["availableReplicas"] < 1]
            functions["ready"] = functions["total"] - len(functions["not_ready"])
        except (requests.RequestException, ValueError, KeyError, TypeError):
            functions["not_ready"] = ["(the gateway's function list did not answer)"]
    down = [n for n, p in parts.items() if not p["healthy"] and p.get("used", True)]
    if parts["gateway"]["healthy"] and (functions["not_ready"] or not functions["total"]):
        down.append("functions")
    return {"gateway_url": cfg.gateway_url, "parts": parts, "functions": functions,
            "down": down}  # fmt: skip


def not_ready_report(cfg: LocalConfig) -> str:
    """Which functions are not ready, with the end of each one's log."""
    try:
        listed = requests.get(
            f"{cfg.gateway_url}/system/functions", auth=system_auth(cfg), timeout=5
        ).json()
        names = [fn["name"] for fn in listed if fn["availableReplicas"] < 1]
    except requests.RequestException:
        names = ["gateway"]
    lines = []
    for name in names:
        log = cfg.logs / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
        lines.append(f"{name} is not ready; {log}:\n  " + "\n  ".join(tail))
    return "\n".join(lines)


def down(cfg: LocalConfig, say=print) -> None:
    """Stop the gateway (and with it every function), the registry, S3 and NATS; data stays
    for next time."""
    parts = ("cron-connector", "gateway", "vault", "oidc", "git", "registry", "s3", "nats",
             "jaeger", "prometheus")  # fmt: skip
    # The gateway first drains its functions (DRAIN_S each, all at once).
    stopped = [name for name in parts if processes.stop(cfg.run, name, timeout=DRAIN_S + 15)]
    if killed := kill_stale(cfg):  # left by a gateway that was killed
        stopped.append(f"{killed} function processes")
    # Those a gateway killed mid-stop left behind; this stops the engine's service too.
    if removed := remove_containers(cfg):
        stopped.append(f"{removed} containers")
    say(f"stopped {', '.join(stopped)}" if stopped else "faas-ci was not running")


def remove_containers(cfg: LocalConfig) -> int:
    """Remove this stack's function containers, if it ever ran any."""
    try:
        from .containers import remove_all
    except ImportError:  # no docker SDK installed: no containers were run
        return 0
    return remove_all(cfg)
