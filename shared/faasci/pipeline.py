"""The per-repository pipeline file, `.faasci.yml`, and the defaults used when there is none.

    service: my-service
    env: {KEY: value}
    stages:
      unit: {run: ["pytest"], timeout: 300, retries: 1}

Listed stages run in the canonical order of faasci.STAGES; unlisted ones are skipped.
Unknown keys are kept (later features read them) but never change these keys' meaning.
Without a file, `default` derives the pipeline from what the commit holds, and says why.
"""

from __future__ import annotations

import random
import re
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from . import STAGES, defaults
from .defaults import FILENAME, Reader
from .downstream import DependsOn
from .errors import Unprocessable
from .fields import EnvValue
from .gitops import GitOpsSpec
from .rollout import ArgoCDTarget, OpenFaaSTarget, check_stage
from .scan import ScanSpec

RetryReason = Literal["exit", "timeout", "infra"]
BUILT = "built"  # a stage's `image:` meaning the image this run's build stage pushed


class Backoff(BaseModel):
    """Waiting before a retry: exponential with jitter, capped. Attempt n+1 waits
    min(max_s, initial_s * factor**(n-1)), scaled by a random factor in [1 - jitter, 1]."""

    model_config = ConfigDict(extra="forbid")

    initial_s: float = Field(default=5, ge=0, le=3600)
    factor: float = Field(default=2, ge=1, le=10)
    max_s: float = Field(default=300, ge=0, le=6 * 3600)
    jitter: float = Field(default=0.5, ge=0, le=1)

    def delay(self, failed_attempt: int) -> float:
        base = min(self.max_s, self.initial_s * self.factor ** (failed_attempt - 1))
        return round(base * (1 - self.jitter * random.random()), 3)


class CacheSpec(BaseModel):
    """A dependency cache: `setup` fills `paths` (in the service folder, or under `~/`); the
    archive is keyed by the repository, the `manifests`' contents and the stage runtime.
    `prepare` runs in every stage that uses the cache, once it is in place (restored or
    just set up): the place for `pip install --no-deps -e .`, so the commit's own code is
    what gets tested, never a copy cached from an earlier commit."""

    model_config = ConfigDict(extra="forbid")

    setup: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    paths: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    manifests: list[Annotated[str, Field(min_length=1)]] = []  # default: by project type
    prepare: list[Annotated[str, Field(min_length=1)]] = []
    # The set-up has a timeout of its own: the stage's `timeout` covers prepare and run.
    setup_timeout: int = Field(default=1800, gt=0, le=6 * 3600, strict=True,
                               description="seconds")  # fmt: skip

    @field_validator("setup", "paths", "manifests", "prepare", mode="before")
    @classmethod
    def _one_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("paths")
    @classmethod
    def _inside(cls, paths):
        for path in paths:
            rel = path.removeprefix("~/")
            if rel.startswith("/") or ".." in rel.split("/") or rel in ("", "."):
                raise ValueError(f"{path!r} must be a folder inside the service or under ~/")
        return paths


def _inside_checkout(path: str) -> str:
    if path.startswith("/") or ".." in path.split("/") or not path.strip():
        raise ValueError(f"{path!r} must be a path inside the repository (relative, no '..')")
    return path


class DockerBuild(BaseModel):
    """The build stage's image: `file` built with `context` (both relative to the service
    folder), an optional multi-stage `target` and build `args`, pushed to `repository`
    (default: <FAASCI_REGISTRY>/<service>) tagged with the commit, then named by digest."""

    model_config = ConfigDict(extra="forbid")

    file: Annotated[str, AfterValidator(_inside_checkout)] = "Dockerfile"
    context: Annotated[str, AfterValidator(_inside_checkout)] = "."
    target: str | None = Field(default=None, min_length=1, max_length=128,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # fmt: skip
    args: dict[str, EnvValue] = {}
    repository: str | None = Field(default=None, min_length=1, max_length=255,
                                   pattern=r"^[a-z0-9][a-z0-9._:/-]*[a-z0-9]$")  # fmt: skip


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by faas-ci for every stage: a secret may not take their place.
RESERVED_ENV = {"PATH", "HOME", "LANG", "CI", "TMPDIR", "PWD", "SHELL", "USER", "LD_PRELOAD",
                "LD_LIBRARY_PATH"}  # fmt: skip


class SecretSpec(BaseModel):
    """Where a stage secret comes from: "<path>#<key>", the path inside the repository's
    own folder of the Vault KV mount (faasci.vault.repo_path), never outside it. With
    `file: true` the value is written (0600) into the stage's HOME and `<NAME>_FILE`
    holds its path; otherwise `<NAME>` holds the value."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: str = Field(alias="from", min_length=3, max_length=300)
    file: bool = False

    @field_validator("source")
    @classmethod
    def _reference(cls, source: str) -> str:
        from .vault import SEGMENT_RE, check_path

        path, sep, key = source.partition("#")
        if not sep or not key:
            raise ValueError(f"{source!r} must be '<path>#<key>', e.g. 'db#password'")
        check_path(path)
        if not SEGMENT_RE.match(key):
            raise ValueError(f"key {key!r} must be letters, digits, '.', '_' or '-'")
        return source

    @property
    def path(self) -> str:
        return self.source.partition("#")[0]

    @property
    def key(self) -> str:
        return self.source.partition("#")[2]

    @model_serializer
    def _as_written(self):
        return {"from": self.source, "file": True} if self.file else self.source


def _secret_ref(value):
    return {"from": value} if isinstance(value, str) else value


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    # The build stage only: build and push the service's image (see DockerBuild), after
    # the commands. `image: built` on a later stage runs its commands in that image.
    docker: DockerBuild | None = None
    # The Trivy gate on that image (faasci.scan): on whenever `docker` is set; `false` or
    # its options (max_cvss, ignore, secrets) turn it off or tune it.
    scan: ScanSpec | None = None
    # The deploy stage only: roll the run's image out to exactly one target and wait until
    # it is healthy (faasci.rollout).
    openfaas: OpenFaaSTarget | None = None
    argocd: ArgoCDTarget | None = None
    # The promote stage only: write the run's image into an environment repository
    # (faasci.gitops).
    gitops: GitOpsSpec | None = None
    # The commands; a stage that builds an image (`docker`) or rolls out may have none.
    run: list[Annotated[str, Field(min_length=1)]] = Field(default=[], validate_default=True)
    # Strict: YAML's `true` is not a number of seconds or of retries.
    timeout: int = Field(default=600, gt=0, le=6 * 3600, strict=True, description="seconds")
    retries: int = Field(default=3, ge=0, le=10, strict=True)
    # As the seed says: a failing test is retried (with the back-off) before the one alert;
    # a pipeline narrows it (e.g. `retry_on: [timeout, infra]` to fail fast on a test).
    retry_on: list[RetryReason] = ["exit", "timeout", "infra"]
    backoff: Backoff = Backoff()
    cache: bool = True  # restore the pipeline's dependency cache first (when it has one)
    # A container image to run the commands in (through the engine at DOCKER_HOST); without
    # one they run in the function's own environment, isolated (see faasci.sandbox).
    image: str | None = Field(default=None, min_length=1, max_length=300,
                              pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")  # fmt: skip

    # Secrets from Vault this stage (and only this stage) gets: {ENV_NAME: "path#key"} or
    # {ENV_NAME: {from: "path#key", file: true}}; see SecretSpec.
    secrets: dict[str, Annotated[SecretSpec, BeforeValidator(_secret_ref)]] = {}

    @field_validator("run", mode="before")
    @classmethod
    def _one_command_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("run")
    @classmethod
    def _commands_or_an_image(cls, run, info: ValidationInfo):
        delivers = ("docker", "openfaas", "argocd", "gitops")
        if not run and not any(info.data.get(k) for k in delivers):
            raise ValueError("a stage needs at least one command (or, to build, `docker`; "
                             "to deploy, `openfaas` or `argocd`; to promote, "
                             "`gitops`)")  # fmt: skip
        return run

    @field_validator("scan")
    @classmethod
    def _scan_needs_an_image(cls, scan, info: ValidationInfo):
        if scan is not None and not info.data.get("docker"):
            raise ValueError("`scan` applies to the image `docker` builds; this stage has none")
        return scan

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, secrets):
        for name, spec in secrets.items():
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            var = f"{name}_FILE" if spec.file else name
            if var in RESERVED_ENV or var.startswith("FAASCI"):
                raise ValueError(f"{var!r} is set by faas-ci; name the secret otherwise")
        return secrets


class Pipeline(BaseModel):
    model_config = ConfigDict(extra="allow")

    service: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    env: dict[str, EnvValue] = {}
    cache: CacheSpec | None = None
    # Packages (as manifests name them) or services this one depends on: when one moves,
    # this service's integration stage runs against it (faasci.downstream).
    depends_on: DependsOn = []
    stages: dict[str, StageSpec] = Field(min_length=1)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env):
        for name in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return env

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages, info: ValidationInfo):
        for name in stages:
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        env = info.data.get("env") or {}
        for name, spec in stages.items():
            if spec.docker and name != "build":
                raise ValueError(f"{name}.docker: only the build stage builds an image")
            if spec.gitops and name != "promote":
                raise ValueError(f"{name}.gitops: only the promote stage promotes")
            check_stage(name, spec)  # deploy targets (faasci.rollout)
            if spec.image == BUILT and not (
                stages.get("build")
                and stages["build"].docker
                and STAGES.index(name) > STAGES.index("build")
            ):
                raise ValueError(f"{name}.image: `built` needs a build stage with `docker` "
                                 "before it")  # fmt: skip
            for secret_name, secret in spec.secrets.items():
                var = f"{secret_name}_FILE" if secret.file else secret_name
                if var in env:
                    raise ValueError(
                        f"{name}.secrets.{secret_name}: {var} is also in env; a "
                        "secret cannot share its name with a plain variable"
                    )
        return {name: stages[name] for name in STAGES if name in stages}

    def stage_names(self) -> list[str]:
        return list(self.stages)

    def to_yaml(self) -> str:
        """The pipeline as a pipeline file would say it (values left at their default omitted)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, width=1000)


# libyaml's parser where PyYAML has it: every run's start parses its pipeline file, and the
# pure-Python parser spends ~10 ms of CPU on a short one.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse(text: str, default_service: str) -> Pipeline:
    """Parse a pipeline file; errors name the offending field."""
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        if "nesting depth" in str(getattr(e, "problem", "")):  # libyaml's own limit
            raise Unprocessable(f"{FILENAME} nests too deeply", field=FILENAME) from None
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise Unprocessable(f"{FILENAME} is not valid YAML{where}", field=FILENAME) from None
    except RecursionError:  # a repository's file may nest without end: a 422, not a 500
        raise Unprocessable(f"{FILENAME} nests too deeply", field=FILENAME) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Unprocessable(f"{FILENAME} must be a mapping", field=FILENAME)
    data.setdefault("service", default_service)
    return validate(data)


def validate(data: dict) -> Pipeline:
    try:
        return Pipeline.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or FILENAME
        raise Unprocessable(f"{FILENAME}: {field}: {first['msg']}", field=field) from None


def load(text: str | None, files: set[str], service: str, read: Reader | None = None) -> Pipeline:
    """A repository's pipeline: its pipeline file when it has one, else the default (which
    reads the project's manifests with `read`)."""
    return explain(text, files, service, read)[0]


def explain(
    text: str | None, files: set[str], service: str, read: Reader | None = None
) -> tuple[Pipeline, list[str]]:
    """`load`, and why the pipeline is what it is (`faasci run --explain`)."""
    if text is None:
        data, why = defaults.derive(files, read or (lambda name: None))
        return validate({"service": service, **data}), why
    return parse(text, service), [f"the commit's {FILENAME}"]


def default(files: set[str], service: str, read: Reader | None = None) -> Pipeline:
    """The pipeline for a repository without a pipeline file (see faasci.defaults)."""
    return explain(None, files, service, read)[0]
