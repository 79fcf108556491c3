"""One settings object: configuration from the environment, secrets from files.

OpenFaaS mounts each secret as a file under /var/openfaas/secrets/<name>; the local stack
points FAASCI_SECRETS_DIR at a folder laid out the same way. Secret values never live in
the environment and are never logged.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

OPENFAAS_SECRETS_DIR = "/var/openfaas/secrets"


@dataclass(frozen=True)
class Settings:
    gateway_url: str = "http://gateway.openfaas:8080"
    public_url: str = ""  # base of links people follow (log links); the gateway's by default
    nats_url: str = "nats://nats.openfaas:4222"
    s3_endpoint: str = ""  # empty means AWS itself
    s3_region: str = "us-east-1"
    bucket: str = "faasci"
    secrets_dir: Path = Path(OPENFAAS_SECRETS_DIR)
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "faasci-work")
    snapshots_dir: Path | None = (
        None  # git store of working-tree snapshots; under workdir by default
    )
    scheduled_repos: tuple[str, ...] = ()  # "<repo>[#<ref>]" entries a cron request runs
    # The node-local layer of unpacked dependency caches, shared by the functions of a node.
    cache_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "faasci-cache")
    cache_max_bytes: int = 20 * 2**30
    # Where every stage sees its checkout (`src/`) and HOME (`home/`): one absolute path on
    # every run, so virtualenvs and tools' absolute paths restored from a cache still work.
    workspace: Path = field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "faasci-workspace"
    )
    sandbox_hide: tuple[Path, ...] = ()  # more folders stages must not see (besides ours)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        gateway = env.get("GATEWAY_URL", defaults.gateway_url).rstrip("/")
        return cls(
            gateway_url=gateway,
            public_url=env.get("PUBLIC_URL", gateway).rstrip("/"),
            nats_url=env.get("NATS_URL", defaults.nats_url),
            s3_endpoint=env.get("S3_ENDPOINT", defaults.s3_endpoint),
            s3_region=env.get("S3_REGION", defaults.s3_region),
            bucket=env.get("S3_BUCKET", defaults.bucket),
            secrets_dir=Path(env.get("FAASCI_SECRETS_DIR", OPENFAAS_SECRETS_DIR)),
            workdir=Path(env["FAASCI_WORKDIR"]) if env.get("FAASCI_WORKDIR") else defaults.workdir,
            snapshots_dir=Path(env["FAASCI_SNAPSHOTS"]) if env.get("FAASCI_SNAPSHOTS") else None,
            scheduled_repos=tuple(r for r in env.get("SCHEDULED_REPOS", "").split() if r),
            cache_dir=Path(env["FAASCI_CACHE_DIR"]) if env.get("FAASCI_CACHE_DIR")
            else defaults.cache_dir,
            cache_max_bytes=int(env.get("FAASCI_CACHE_MAX_BYTES", defaults.cache_max_bytes)),
            workspace=Path(env["FAASCI_WORKSPACE"]) if env.get("FAASCI_WORKSPACE")
            else defaults.workspace,
            sandbox_hide=tuple(Path(p) for p in env.get("FAASCI_SANDBOX_HIDE", "").split(":")
                               if p),
        )  # fmt: skip

    @property
    def snapshots(self) -> Path:
        return self.snapshots_dir or self.workdir / "snapshots.git"

    def scheduled(self) -> list[tuple[str, str | None]]:
        """The scheduled repositories as (repo, ref or None)."""
        return [(repo, ref or None) for repo, _, ref in
                (entry.partition("#") for entry in self.scheduled_repos)]  # fmt: skip

    def secret(self, name: str) -> str | None:
        """The secret's value, whitespace trimmed; None when it is not mounted."""
        try:
            return (self.secrets_dir / name).read_text().strip()
        except FileNotFoundError:
            return None


_current: Settings | None = None


def settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def configure(value: Settings | None) -> None:
    """Replace the process's settings (None: read the environment again on next use)."""
    global _current
    _current = value
