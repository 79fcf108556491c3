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
NATS_TOKEN_SECRET = "nats-token"  # the NATS password of every function (and the CLI)


@dataclass(frozen=True)
class Settings:
    gateway_url: str = "http://gateway.openfaas:8080"
    public_url: str = ""  # base of links people follow (log links); the gateway's by default
    nats_url: str = "nats://nats.openfaas:4222"
    nats_user: str = "faasci"  # with the secret `nats-token` as its password, when mounted
    s3_endpoint: str = ""  # empty means AWS itself
    s3_region: str = "us-east-1"
    bucket: str = "faasci"
    registry: str = "127.0.0.1:5000"  # where build stages push images: host[:port][/prefix]
    # The platform's environment repository: where a promote stage's `gitops` writes when it
    # names no `repository` of its own.
    gitops_repository: str = ""
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
    # Vault (OpenBao locally): platform secrets and stages' own (see faasci.vault).
    vault_addr: str = "http://vault.vault:8200"
    vault_auth: str = "approle"  # or "kubernetes" (the function's service account)
    vault_mount: str = "secret"  # the KV v2 mount
    vault_role: str = "faasci-functions"  # kubernetes auth: the role to log in as
    vault_auth_mount: str = ""  # the auth method's mount; by default its type's name
    vault_approle: str = "vault"  # approle auth: secrets <this>-role-id, <this>-secret-id
    vault_jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        defaults = cls()
        gateway = env.get("GATEWAY_URL", defaults.gateway_url).rstrip("/")
        return cls(
            gateway_url=gateway,
            public_url=env.get("PUBLIC_URL", gateway).rstrip("/"),
            nats_url=env.get("NATS_URL", defaults.nats_url),
            nats_user=env.get("NATS_USER", defaults.nats_user),
            s3_endpoint=env.get("S3_ENDPOINT", defaults.s3_endpoint),
            s3_region=env.get("S3_REGION", defaults.s3_region),
            bucket=env.get("S3_BUCKET", defaults.bucket),
            registry=env.get("FAASCI_REGISTRY", defaults.registry).rstrip("/"),
            gitops_repository=env.get("FAASCI_GITOPS_REPOSITORY", defaults.gitops_repository),
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
            vault_addr=env.get("VAULT_ADDR", defaults.vault_addr).rstrip("/"),
            vault_auth=env.get("VAULT_AUTH", defaults.vault_auth),
            vault_mount=env.get("VAULT_MOUNT", defaults.vault_mount).strip("/"),
            vault_role=env.get("VAULT_ROLE", defaults.vault_role),
            vault_auth_mount=env.get("VAULT_AUTH_MOUNT", defaults.vault_auth_mount).strip("/"),
            vault_approle=env.get("VAULT_APPROLE_SECRETS", defaults.vault_approle),
            vault_jwt_file=Path(env.get("VAULT_JWT_FILE") or defaults.vault_jwt_file),
        )  # fmt: skip

    @property
    def snapshots(self) -> Path:
        return self.snapshots_dir or self.workdir / "snapshots.git"

    def scheduled(self) -> list[tuple[str, str | None]]:
        """The scheduled repositories as (repo, ref or None)."""
        return [(repo, ref or None) for repo, _, ref in
                (entry.partition("#") for entry in self.scheduled_repos)]  # fmt: skip

    def nats_credentials(self) -> dict[str, str | None]:
        """Bus keywords: NATS_USER with the secret `nats-token` (none without the secret)."""
        token = self.secret(NATS_TOKEN_SECRET)
        return {"user": self.nats_user, "password": token} if token else {}

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
