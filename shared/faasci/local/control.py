"""`faasci up` and `faasci down`: start the local stack once, stop everything it started."""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import replace

import requests

from ..objects import ObjectStore
from ..settings import Settings
from . import processes, services
from .config import LocalConfig

# Secrets the stack can make for itself, and those it leaves empty for people to fill in
# (an empty Slack secret means "not configured"); any other secret must be provided.
GENERATED_SECRETS = ("s3-access-key", "s3-secret-key", "webhook-secret")
EMPTY_SECRETS = ("slack-webhook-url", "slack-bot-token")


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


def functions_ready(cfg: LocalConfig) -> bool:
    listed = requests.get(f"{cfg.gateway_url}/system/functions", timeout=5).json()
    return all(fn["availableReplicas"] >= 1 for fn in listed)


def ensure_secrets(cfg: LocalConfig) -> None:
    cfg.secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (*GENERATED_SECRETS, *EMPTY_SECRETS):
        path = cfg.secrets_dir / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(24) if name in GENERATED_SECRETS else "")
            os.chmod(path, 0o600)


def up(cfg: LocalConfig, say=print) -> bool:
    """Start what is not running; False when the stack was already up."""
    if processes.pid_of(cfg.run, "gateway") and gateway_healthy(cfg):
        say(f"faas-ci is already up: gateway {cfg.gateway_url}")
        return False
    for folder in (cfg.data, cfg.logs, cfg.run, cfg.workdir):
        folder.mkdir(parents=True, exist_ok=True)
    ensure_secrets(cfg)
    env = {**os.environ, **cfg.env()}
    settings = client_settings(cfg)
    services.write_s3_identities(
        cfg, settings.secret("s3-access-key"), settings.secret("s3-secret-key")
    )
    if services.start_nats(cfg, env):
        say(f"NATS (JetStream) on {cfg.nats_url}")
    if services.start_s3(cfg, env):
        say(f"S3 (SeaweedFS) on {cfg.s3_url}")
    store = ObjectStore(settings)
    processes.wait_until(lambda: store.ensure_bucket() is None, 60, "the S3 bucket")
    processes.stop(cfg.run, "gateway")  # a gateway that is alive but unhealthy
    processes.start(
        cfg.run,
        "gateway",
        [sys.executable, "-m", "faasci.local.gateway"],
        cfg.logs / "gateway.log",
        env,
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
    return True


def not_ready_report(cfg: LocalConfig) -> str:
    """Which functions are not ready, with the end of each one's log."""
    try:
        listed = requests.get(f"{cfg.gateway_url}/system/functions", timeout=5).json()
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
    """Stop the gateway (and with it every function), S3 and NATS; data stays for next time."""
    stopped = [name for name in ("gateway", "s3", "nats") if processes.stop(cfg.run, name)]
    say(f"stopped {', '.join(stopped)}" if stopped else "faas-ci was not running")
