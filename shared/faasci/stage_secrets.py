"""A stage's own secrets: read from Vault before its commands run, given to those commands
only (not to the cache set-up, whose result other stages restore), and masked in everything
the stage leaves behind.

    stages:
      unit:
        secrets:
          DB_PASSWORD: db#password                   # $DB_PASSWORD holds the value
          TLS_KEY: {from: "tls#key", file: true}     # $TLS_KEY_FILE names a 0600 file

Paths are inside the repository's own folder of the KV mount,
`faasci/repos/<cache.namespace_of(repo)>/<path>` (faasci.vault.repo_path), so a pipeline
can name neither another repository's secrets nor the platform's. A stage gets exactly the
secrets its own entry declares. A secret that is missing fails the attempt with an error
naming its path (reason "secrets", not retried: someone has to write it); Vault being
unreachable is infrastructure trouble (reason "infra", retried).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import cache, masking, vault
from .runs import Run

log = logging.getLogger("faasci.stage")

FOLDER = ".faasci-secrets"  # in the stage's HOME


@dataclass
class StageSecrets:
    """What a stage's commands get, and the masker of everything they could know."""

    values: dict[str, str] = field(default_factory=dict)  # NAME -> value
    as_file: set[str] = field(default_factory=set)  # the NAMEs given as files
    masker: masking.Masker = field(default_factory=masking.Masker)
    reason: str | None = None  # why they could not be had: "secrets" or "infra"
    error: str | None = None

    def place(self, home: Path, stable_home: Path) -> dict[str, str]:
        """Write the file secrets into `home` (the attempt's real HOME, seen by the commands
        at `stable_home`); the environment variables to add to the commands'."""
        env = {}
        for name, value in self.values.items():
            if name not in self.as_file:
                env[name] = value
                continue
            folder = home / FOLDER
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = folder / name
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value)
            env[f"{name}_FILE"] = str(stable_home / FOLDER / name)
        return env


def platform_masker() -> masking.Masker:
    """The platform's secrets this process knows (masked in stage logs as well: a stage
    cannot read them, but nothing it prints may show them either)."""
    try:
        for name in vault.PLATFORM_SECRETS:
            with contextlib.suppress(vault.VaultError):
                vault.platform_secret(name)
        return masking.process_masker()
    except Exception as e:  # masking what can be had beats failing the stage
        log.warning("the platform's secrets could not all be read for masking: %s", e)
        return masking.Masker()


def load(run: Run, stage: str) -> StageSecrets:
    """Read the stage's declared secrets (never raises: a failure is in reason/error)."""
    spec = run.pipeline.stages[stage]
    held = StageSecrets(masker=platform_masker())
    if not spec.secrets:
        return held
    namespace = cache.namespace_of(run.repo)
    try:
        client = vault.vault()
        for name, secret in spec.secrets.items():
            try:
                held.values[name] = client.stage_secret(namespace, secret.path, secret.key)
            except vault.SecretNotFound as e:
                held.reason, held.error = "secrets", f"stage secret {name}: {e}"
                return held
            if secret.file:
                held.as_file.add(name)
        stage_masker = masking.Masker.strict(held.values)
    except masking.Unmaskable as e:
        held.values.clear()
        held.reason, held.error = "secrets", str(e)
        return held
    except (vault.VaultError, ValueError) as e:
        held.values.clear()
        held.reason, held.error = "infra", f"reading the stage's secrets: {e}"
        return held
    held.masker.add(stage_masker.values)
    return held


@contextlib.contextmanager
def in_use(held: StageSecrets) -> Iterator[None]:
    """While the stage runs: its secrets masked in this process's log too, and the Vault
    token kept alive (a stage may outlast the token's TTL)."""
    handle = masking.register(held.masker)
    try:
        with contextlib.ExitStack() as kept:
            if held.values:
                try:
                    kept.enter_context(vault.vault().held())
                except vault.VaultError as e:  # the values are in hand: the stage goes on
                    log.warning("keeping the Vault token alive: %s", e)
            yield
    finally:
        masking.unregister(handle)
