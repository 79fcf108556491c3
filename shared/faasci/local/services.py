"""The real servers of the local stack: NATS with JetStream, SeaweedFS's S3 gateway, the
image registry (Distribution's docker-registry), git daemon serving the environment
repository, and OpenFaaS's cron-connector when its binary is available."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import requests
import yaml

from ..audit import STREAM as AUDIT_STREAM
from . import processes
from .config import LocalConfig, openfaas_tool, tool


def nats_argv(cfg: LocalConfig) -> list[str]:
    return [
        tool("nats-server"),
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        str(cfg.nats_port),
        "-sd",
        str(cfg.data / "nats"),
        "-m",
        str(cfg.nats_port + 4000),
        "-n",
        "faasci",
        "-c",
        str(cfg.run / "nats.conf"),
    ]


def s3_argv(cfg: LocalConfig) -> list[str]:
    """SeaweedFS's master, volume, filer and S3 gateway on ports just above the S3 port
    (HTTP at +1..+3, gRPC at +10..+13). S3 requires the stack's own credentials. Volumes
    of 256 MB, as many as the disk holds (`-volume.max=0`): the default of 8 is 7 taken by
    SeaweedFS's own collections and one 256 MB volume for everything stored."""
    p = cfg.s3_port
    return [
        tool("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-dir={cfg.data / 's3'}", "-master.telemetry=false", "-master.volumeSizeLimitMB=256",
        "-volume.max=0",
        f"-master.port={p + 1}", f"-volume.port={p + 2}", f"-filer.port={p + 3}",
        f"-s3.port.grpc={p + 10}", f"-master.port.grpc={p + 11}",
        f"-volume.port.grpc={p + 12}", f"-filer.port.grpc={p + 13}",
        "-s3", f"-s3.port={p}", f"-s3.config={cfg.run / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip


def write_s3_identities(cfg: LocalConfig, access_key: str, secret_key: str) -> None:
    identities = {
        "identities": [
            {
                "name": "faasci",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    path = cfg.run / "s3.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identities))
    os.chmod(path, 0o600)


# What no NATS client may ask for, not even the platform's own functions: removing audit
# entries (faasci.audit) or loosening the stream's deny_delete/deny_purge.
NATS_DENIED = [
    f"$JS.API.STREAM.{op}.{AUDIT_STREAM}" for op in ("DELETE", "PURGE", "MSG.DELETE", "UPDATE")
]


def write_nats_config(cfg: LocalConfig, user: str, password: str) -> None:
    """NATS's configuration (0600): one user, the stack's, whose password is the secret
    `nats-token`; a client without it cannot connect (a stage's commands among them)."""
    config = {
        "authorization": {
            "users": [
                {
                    "user": user,
                    "password": password,
                    "permissions": {"publish": {"deny": NATS_DENIED}},
                }
            ]
        }
    }
    path = cfg.run / "nats.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:  # JSON is valid NATS configuration syntax
        f.write(json.dumps(config, indent=2))
    os.chmod(path, 0o600)


def nats_ready(cfg: LocalConfig) -> bool:
    r = requests.get(
        f"http://127.0.0.1:{cfg.nats_port + 4000}/healthz?js-enabled-only=true", timeout=2
    )
    return r.status_code == 200


def s3_ready(cfg: LocalConfig) -> bool:
    # Any HTTP answer from the S3 port (403 without credentials) means the gateway is serving.
    return requests.get(cfg.s3_url, timeout=2).status_code in (200, 403)


def start_nats(cfg: LocalConfig, env: dict[str, str]) -> bool:
    if processes.pid_of(cfg.run, "nats"):
        return False
    (cfg.data / "nats").mkdir(parents=True, exist_ok=True)
    processes.start(cfg.run, "nats", nats_argv(cfg), cfg.logs / "nats.log", env)
    processes.wait_until(lambda: nats_ready(cfg), 30, "NATS")
    return True


S3_STARTS = 4


def start_s3(cfg: LocalConfig, env: dict[str, str]) -> bool:
    if processes.pid_of(cfg.run, "s3"):
        return False
    (cfg.data / "s3").mkdir(parents=True, exist_ok=True)
    # SeaweedFS listens on eight ports and exits at once when one of them is still taken
    # (seen right after the one it replaces was killed): started again, a few times.
    for tries_left in reversed(range(S3_STARTS)):
        pid = processes.start(cfg.run, "s3", s3_argv(cfg), cfg.logs / "s3.log", env,
                              cwd=cfg.data / "s3")  # fmt: skip
        up_or_gone = lambda pid=pid: s3_ready(cfg) or not processes.alive(pid)  # noqa: E731
        processes.wait_until(up_or_gone, 60, "SeaweedFS S3")
        if processes.alive(pid) or not tries_left:
            break
        time.sleep(2)
    if not processes.alive(pid):
        raise TimeoutError(f"SeaweedFS S3 exited at its start {S3_STARTS} times: see "
                           f"{cfg.logs / 's3.log'}")  # fmt: skip
    return True


def write_registry_config(cfg: LocalConfig) -> None:
    """docker-registry's configuration: plain HTTP on 127.0.0.1 only (Podman is told it is
    insecure, engine.py), images on disk under data/, deleting manifests allowed."""
    config = {
        "version": 0.1,
        "log": {"level": "info"},
        "storage": {
            "filesystem": {"rootdirectory": str(cfg.data / "registry")},
            "delete": {"enabled": True},
        },
        # A fixed secret: it signs upload state, and there is only this one instance.
        "http": {"addr": cfg.registry, "secret": "faasci-local-registry"},
        # /v2/ answers 503 once the storage has failed three checks in a row.
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
    }
    path = cfg.run / "registry.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def registry_argv(cfg: LocalConfig) -> list[str]:
    binary = shutil.which("docker-registry")  # Debian's package, not pip's: not beside Python
    if not binary:
        raise SystemExit("docker-registry is not installed; run ./scripts/install")
    return [binary, "serve", str(cfg.run / "registry.yml")]


def registry_ready(cfg: LocalConfig) -> bool:
    return requests.get(f"http://{cfg.registry}/v2/", timeout=2).status_code == 200


# The environment repository `up` makes: the example service's environments, one file each
# in the two forms a promotion writes (Helm values, a kustomization).
ENVIRONMENTS_SEED = {
    "README.md": "# Environments\n\nWhat each environment runs, written by faas-ci's promote "
    "stages (one commit per promotion).\n",
    "sample-service/staging/values.yaml": 'replicaCount: 1\nimage:\n  repository: ""\n'
    '  digest: ""\n',
    "sample-service/production/kustomization.yaml": "resources: [deployment.yaml]\nimages:\n"
    "  - name: sample-service\n",
}


def ensure_environments_repository(cfg: LocalConfig) -> Path:
    """The bare repository under data/git, made and seeded once; pushes that would rewrite
    its history are refused, as a protected branch's would be."""
    bare = cfg.data / "git" / "environments.git"
    if (bare / "HEAD").exists():
        return bare
    seed = cfg.data / "git" / "environments.seed"
    shutil.rmtree(seed, ignore_errors=True)
    for name, text in ENVIRONMENTS_SEED.items():
        (seed / name).parent.mkdir(parents=True, exist_ok=True)
        (seed / name).write_text(text)
    made = bare.with_suffix(".new")
    shutil.rmtree(made, ignore_errors=True)
    for argv in (["init", "--quiet", "--initial-branch=main", str(seed)],
                 ["-C", str(seed), "add", "-A"],
                 ["-C", str(seed), "-c", "user.name=faas-ci", "-c", "user.email=faas-ci@localhost",
                  "commit", "--quiet", "-m", "Environments of the local stack"],
                 ["clone", "--quiet", "--bare", str(seed), str(made)],
                 ["-C", str(made), "config", "receive.denyNonFastForwards", "true"],
                 ["-C", str(made), "config", "receive.denyDeletes", "true"]):  # fmt: skip
        subprocess.run(["git", *argv], check=True, capture_output=True)
    shutil.rmtree(seed)
    made.rename(bare)  # whole or not at all
    return bare


def git_argv(cfg: LocalConfig) -> list[str]:
    """git-daemon itself, not `git daemon`: git would run it as a child, and stopping the
    recorded pid would leave the daemon holding its port."""
    root = cfg.data / "git"
    exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    return [str(Path(exec_path) / "git-daemon"), "--reuseaddr", "--export-all",
            "--enable=receive-pack",
            f"--base-path={root}", "--listen=127.0.0.1", f"--port={cfg.git_port}",
            str(root)]  # fmt: skip


def git_ready(cfg: LocalConfig) -> bool:
    done = subprocess.run(["git", "ls-remote", "--heads", cfg.environments_repository],
                          capture_output=True, timeout=10)  # fmt: skip
    return done.returncode == 0


def start_git(cfg: LocalConfig, env: dict[str, str]) -> bool:
    if processes.pid_of(cfg.run, "git"):
        return False
    ensure_environments_repository(cfg)
    processes.start(cfg.run, "git", git_argv(cfg), cfg.logs / "git.log", env)
    processes.wait_until(lambda: git_ready(cfg), 30, "git daemon")
    return True


def start_registry(cfg: LocalConfig, env: dict[str, str]) -> bool:
    if processes.pid_of(cfg.run, "registry"):
        return False
    (cfg.data / "registry").mkdir(parents=True, exist_ok=True)
    write_registry_config(cfg)
    # REGISTRY_<SECTION>_<KEY> variables override the configuration file: none gets through.
    env = {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}
    processes.start(cfg.run, "registry", registry_argv(cfg), cfg.logs / "registry.log", env)
    processes.wait_until(lambda: registry_ready(cfg), 30, "the image registry")
    return True


def cron_connector_argv() -> list[str] | None:
    """The real cron-connector, when installed (OPENFAAS_BIN or PATH); else None and the
    gateway's built-in scheduler fires the schedules instead."""
    binary = openfaas_tool("cron-connector")
    return [binary] if binary else None


def start_cron_connector(cfg: LocalConfig, env: dict[str, str], argv: list[str]) -> bool:
    """The connector as a cluster runs it: it lists the gateway's functions every few
    seconds (with the gateway's basic-auth credentials from the secrets folder) and invokes
    those annotated `topic: cron-function` on their `schedule`, synchronously."""
    if processes.pid_of(cfg.run, "cron-connector"):
        return False
    settings = {
        "gateway_url": cfg.gateway_url,
        "basic_auth": "true",
        "secret_mount_path": str(cfg.secrets_dir),
        "rebuild_interval": "10s",
    }
    processes.start(cfg.run, "cron-connector", argv, cfg.logs / "cron-connector.log",
                    {**env, **settings})  # fmt: skip
    return True
