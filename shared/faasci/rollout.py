"""The deploy stage's rollout: the run's image (repository@sha256:…) rolled out to one
target, then watched until it is healthy at that digest, within a timeout.

    stages:
      deploy:
        openfaas: {function: inventory, path: /health, timeout: 120, rollback: true}
        # or
        argocd: {server: https://argocd.example.com, application: inventory,
                 token_secret: ARGOCD_TOKEN}   # one of the stage's `secrets:`

OpenFaaS: the image is deployed as a function through the gateway's REST API exactly as
faas-cli does it (PUT /system/functions to update, POST when that answers 404; basic auth
with the gateway's admin credentials, which the deploy function gets as the secrets
`openfaas-password` and, optionally, `openfaas-user` (default admin), as OpenFaaS's docs
name them for functions that call the API). Then GET /system/function/<name> is polled until
`availableReplicas` >= 1 with `image` equal to the new reference, and a smoke request to
/function/<name><path> must answer 2xx. Otherwise the stage fails with what the platform
said last (its status, the smoke answer's status and body, the function's last log lines),
and, with `rollback`, the previous image is deployed again and waited for.

Argo CD: the application is synced at the promoted revision (the environment repository's
commit the promote stage recorded, else HEAD) with POST /api/v1/applications/<name>/sync,
then GET /api/v1/applications/<name> is polled until it is Synced and Healthy at that
revision; a Degraded application or a Failed operation fails the stage with Argo CD's own
message. Argo CD keeps its own history: rolling back is a GitOps revert (or `argocd app
rollback`), not this stage's.

A failure the platform reports is reason `rollout` (never retried: deploying the same
image again gives the same answer); a gateway or server that cannot be reached, `infra`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, BinaryIO, Literal

import requests
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import FUNCTIONS
from .fields import EnvValue

FUNCTION_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # a DNS-1123 label, as OpenFaaS
APPLICATION_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"  # a Kubernetes object name
HTTP_URL = r"^https?://[^\s/]+(/[^\s]*)?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
POLL_S = 1.0  # how often the target's status is read while waiting
REQUEST_S = 10  # one API request's own timeout
DEPLOY_REQUEST_S = 60  # a deployment's: a provider may stop the old replica first
SMOKE_S = 10  # one smoke request's
BODY_CHARS = 300  # of an answer's body quoted in an error
LOG_LINES = 20  # of the function's log shown when it did not become healthy
Reason = Literal["rollout", "infra", "secrets", "cancelled"]
ROLLOUTS = "faasci-rollouts"  # the KV bucket of rollouts in progress (faasci.once.held)
ROLLOUT_HOLD_S = 3 * 3600  # a holder that died frees its function after this


class OpenFaaSTarget(BaseModel):
    """The run's image as an OpenFaaS function on a gateway (default: the platform's own,
    with the deploy function's credentials). The platform's credentials never go to another
    gateway: its password is one of the stage's own `secrets:` (`password_secret`)."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(pattern=FUNCTION_NAME)
    gateway: str | None = Field(default=None, pattern=HTTP_URL)
    user: str = Field(default="admin", min_length=1, max_length=100)
    password_secret: str | None = Field(default=None, pattern=ENV_NAME)
    path: str = Field(default="/", pattern=r"^/[^\s]*$", max_length=500)  # the smoke request's
    timeout: int = Field(default=120, gt=0, le=3600, strict=True, description="seconds")
    rollback: bool = True  # redeploy the previous image when the new one is not healthy
    env: dict[Annotated[str, Field(pattern=ENV_NAME)],
              EnvValue] = {}  # fmt: skip

    @field_validator("function")
    @classmethod
    def _not_ours(cls, name: str) -> str:
        if name in FUNCTIONS:  # a pipeline may not replace a function of faas-ci itself
            raise ValueError(f"{name!r} is a function of faas-ci; name the service otherwise")
        return name


class ArgoCDTarget(BaseModel):
    """An Argo CD application synced at the promoted revision. Its API token is one of the
    stage's own `secrets:` (`token_secret`, by its name there) or a file the deploy
    function can read (`token_file`, e.g. /var/openfaas/secrets/argocd-token)."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field(pattern=HTTP_URL)
    application: str = Field(pattern=APPLICATION_NAME)
    timeout: int = Field(default=300, gt=0, le=6 * 3600, strict=True, description="seconds")
    token_secret: str | None = Field(default=None, pattern=ENV_NAME)
    token_file: str | None = Field(default=None, pattern=r"^/", max_length=500)
    prune: bool = False  # delete what the revision no longer has (the SyncRequest's prune)

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token_secret is None) == (self.token_file is None):
            raise ValueError("give the API token as exactly one of token_secret (a stage "
                             "secret's name) or token_file (a path)")  # fmt: skip
        return self


def check_stage(name: str, spec) -> None:
    """The pipeline file's rules for a stage's target (pipeline.Pipeline calls this):
    only the deploy stage rolls out, to exactly one target, and a token named by secret is
    one the stage declares."""
    targets = [t for t in ("openfaas", "argocd") if getattr(spec, t, None) is not None]
    if targets and name != "deploy":
        raise ValueError(f"{name}.{targets[0]}: only the deploy stage rolls out")
    if len(targets) > 1:
        raise ValueError(f"{name}: give exactly one target, openfaas or argocd")
    for target, field in (("argocd", "token_secret"), ("openfaas", "password_secret")):
        secret = getattr(getattr(spec, target, None), field, None)
        if secret and secret not in spec.secrets:
            raise ValueError(f"{name}.{target}.{field}: {secret!r} is not one of the stage's "
                             "secrets")  # fmt: skip


class Deployment(BaseModel):
    """What a rollout did, as the deploy attempt records it (`deployment`)."""

    target: Literal["openfaas", "argocd"]
    function: str | None = None  # openfaas
    application: str | None = None  # argocd
    image: str | None = None  # what was rolled out: the run's repository@sha256:…
    revision: str | None = None  # argocd: the revision synced
    previous: str | None = None  # the image (openfaas) or synced revision (argocd) before
    rolled_back_to: str | None = None  # set only when the previous one was healthy again
    healthy_after_s: float | None = None  # from the deployment request until healthy


class Result(BaseModel):
    """A rollout's outcome: `reason`/`error` None when it is healthy."""

    deployment: Deployment
    reason: Reason | None = None
    error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.reason is None


class Failed(Exception):
    def __init__(self, message: str, reason: Reason = "rollout"):
        super().__init__(message)
        self.reason = reason


def say(out: BinaryIO, line: str) -> None:
    out.write(f"[faas-ci] {line}\n".encode())
    out.flush()


def _quote(resp: requests.Response) -> str:
    text = " ".join(resp.text.split())[:BODY_CHARS]
    return f"HTTP {resp.status_code}" + (f": {text}" if text else "")


def _wait(until: Callable[[], str | None], deadline: float, cancel: threading.Event) -> str | None:
    """Call `until` every POLL_S: it answers None when done, else what it saw. None when
    done, else the last thing it saw (at the deadline). Raises Failed when cancelled."""
    while True:
        seen = until()
        if seen is None:
            return None
        if time.monotonic() + POLL_S > deadline:
            return seen
        if cancel.wait(POLL_S):
            raise Failed("cancelled while waiting for the rollout", "cancelled")


# --- OpenFaaS ---------------------------------------------------------------------------


class OpenFaaS:
    """The gateway's REST API, as faas-cli uses it."""

    def __init__(self, gateway: str, auth: tuple[str, str]):
        self.gateway = gateway.rstrip("/")
        self.http = requests.Session()
        self.http.auth = auth

    def _request(self, method: str, path: str, timeout: float = REQUEST_S,
                 **kwargs) -> requests.Response:  # fmt: skip
        try:
            return self.http.request(method, f"{self.gateway}{path}", timeout=timeout, **kwargs)
        except requests.RequestException as e:
            raise Failed(f"the gateway {self.gateway} did not answer: {e}", "infra") from None

    def status(self, name: str) -> dict | None:
        """GET /system/function/<name>: its FunctionStatus, None when it is not deployed."""
        resp = self._request("GET", f"/system/function/{name}")
        if resp.status_code == 404:
            return None
        self._check(resp, f"GET /system/function/{name}")
        return resp.json()

    def deploy(self, body: dict) -> None:
        """Update the function (PUT); create it (POST) when the gateway has none (404), as
        faas-cli deploy does."""
        resp = self._request("PUT", "/system/functions", DEPLOY_REQUEST_S, json=body)
        if resp.status_code == 404:
            resp = self._request("POST", "/system/functions", DEPLOY_REQUEST_S, json=body)
        self._check(resp, "deploying")

    def logs(self, name: str) -> list[str]:
        """The function's last log lines (GET /system/logs), best effort."""
        with contextlib.suppress(Failed, ValueError):
            query = {"name": name, "tail": LOG_LINES, "follow": "false"}
            resp = self._request("GET", "/system/logs", params=query)
            if resp.ok:
                return [json.loads(line).get("text", "") for line in resp.text.splitlines()
                        if line.strip()]  # fmt: skip
        return []

    def smoke(self, name: str, path: str) -> requests.Response:
        try:
            return self.http.get(
                f"{self.gateway}/function/{name}{path}", timeout=SMOKE_S, auth=None
            )  # the route is open; credentials stay on /system
        except requests.RequestException as e:
            raise Failed(f"the smoke request did not get an answer: {e}", "rollout") from None

    def _check(self, resp: requests.Response, doing: str) -> None:
        if resp.status_code in (401, 403):
            raise Failed(f"the gateway refused the deploy function's credentials ({doing}): "
                         f"{_quote(resp)}", "secrets")  # fmt: skip
        if resp.status_code >= 500 and resp.status_code != 501:
            raise Failed(f"the gateway failed ({doing}): {_quote(resp)}", "infra")
        if not resp.ok:
            raise Failed(f"the gateway refused it ({doing}): {_quote(resp)}")


def gateway_credentials(secret: Callable[[str], str | None]) -> tuple[str, str]:
    """The gateway's admin credentials from the function's secrets (`secret(name)`)."""
    password = secret("openfaas-password")
    if not password:
        raise Failed("the deploy function has no gateway credentials: create the secret "
                     "openfaas-password (the gateway's basic-auth password) and list it "
                     "in stack.yml", "secrets")  # fmt: skip
    return secret("openfaas-user") or "admin", password


def _function_body(name: str, image: str, env: dict[str, str]) -> dict:
    """faas-provider's FunctionDeployment of the new image."""
    return {"service": name, "image": image, "envVars": env}


def _body_of(status: dict) -> dict:
    """A FunctionDeployment putting a function back as its FunctionStatus describes it."""
    keys = ("image", "envProcess", "envVars", "labels", "annotations", "secrets", "limits",
            "requests", "constraints", "readOnlyRootFilesystem")  # fmt: skip
    return {"service": status["name"], **{k: status[k] for k in keys if status.get(k)}}


def rollout_openfaas(target: OpenFaaSTarget, image: str, gateway: str, auth: tuple[str, str],
                     out: BinaryIO, cancel: threading.Event) -> Result:  # fmt: skip
    """Deploy `image` as target.function and wait until it is healthy; roll back when it
    is not (and target.rollback)."""
    from . import once  # NATS: imported when a rollout runs (pipeline imports this module)

    name = target.function
    record = Deployment(target="openfaas", function=name, image=image)
    api = OpenFaaS(gateway, auth)
    # One rollout of a function at a time, whichever run or replica starts it: another
    # run's image landing while this one waits for its own would fail both.
    key = f"{hashlib.sha256(api.gateway.encode()).hexdigest()[:16]}.{name}"
    try:
        with once.held(
            ROLLOUTS,
            key,
            ROLLOUT_HOLD_S,
            2 * target.timeout + 60,
            cancel,
            lambda: say(out, f"waiting for another rollout of {name} to end"),
        ):
            return _rollout_openfaas(api, target, image, record, out, cancel)
    except once.NotHeld as e:
        error = f"another rollout of {name} did not end in time ({e})"
        say(out, error)
        return Result(deployment=record, reason="cancelled" if cancel.is_set() else "infra",
                      error=error)  # fmt: skip


def _rollout_openfaas(api: OpenFaaS, target: OpenFaaSTarget, image: str, record: Deployment,
                      out: BinaryIO, cancel: threading.Event) -> Result:  # fmt: skip
    name = target.function
    try:
        current = api.status(name)
        record.previous = current.get("image") if current else None
        say(out, f"deploying {image} as function {name} on {api.gateway}"
                 + (f" (was {record.previous})" if record.previous else " (new)"))  # fmt: skip
        started = time.monotonic()
        api.deploy(_function_body(name, image, target.env))
        seen = _wait(lambda: _unhealthy(api, name, image, target.path),
                     started + target.timeout, cancel)  # fmt: skip
    except Failed as e:
        say(out, str(e))
        return Result(deployment=record, reason=e.reason, error=str(e))
    if seen is None:
        record.healthy_after_s = round(time.monotonic() - started, 3)
        say(out, f"function {name} is healthy at {image} after {record.healthy_after_s:.1f}s "
                 f"(GET /function/{name}{target.path} answered 2xx)")  # fmt: skip
        return Result(deployment=record)
    error = f"function {name} was not healthy at {_digest(image)} within {target.timeout}s: {seen}"
    say(out, error)
    lines = api.logs(name)
    if lines:
        say(out, f"the last lines of {name}'s log (GET /system/logs):")
        out.write("".join(f"  {line}\n" for line in lines).encode())
    if target.rollback and record.previous and record.previous != image and current:
        error += _roll_back(api, current, target, record, out, cancel)
    elif target.rollback:
        error += "; no previous image to roll back to"
    return Result(deployment=record, reason="rollout", error=error)


def _roll_back(api: OpenFaaS, current: dict, target: OpenFaaSTarget, record: Deployment,
               out: BinaryIO, cancel: threading.Event) -> str:  # fmt: skip
    """Deploy the function as it was, and wait for it; what to add to the error."""
    previous, name = record.previous, target.function
    say(out, f"rolling back: deploying {previous} as function {name} again")
    try:
        api.deploy(_body_of(current))
        seen = _wait(lambda: _unhealthy(api, name, previous, target.path),
                     time.monotonic() + target.timeout, cancel)  # fmt: skip
    except Failed as e:
        say(out, f"the rollback failed: {e}")
        return f"; rolling back to {_digest(previous)} failed: {e}"
    if seen is not None:
        say(out, f"the rollback did not become healthy either: {seen}")
        return f"; rolled back to {_digest(previous)}, which is not healthy either: {seen}"
    record.rolled_back_to = previous
    say(out, f"rolled back: function {name} is healthy again at {previous}")
    return f"; rolled back to {_digest(previous)}"


def _unhealthy(api: OpenFaaS, name: str, image: str, path: str) -> str | None:
    """None when the function runs `image` with a replica available and its smoke request
    answers 2xx; else what the gateway says instead."""
    status = api.status(name)
    if status is None:
        return f"GET /system/function/{name} answered 404 (not deployed)"
    available = status.get("availableReplicas") or 0
    if status.get("image") != image:
        return f"the gateway still has image {status.get('image')!r}"
    if available < 1:
        return (f"availableReplicas {available} of {status.get('replicas')} "
                f"(GET /system/function/{name})")  # fmt: skip
    try:
        resp = api.smoke(name, path)
    except Failed as e:  # no answer (yet): waited for like any other state
        return str(e)
    if not 200 <= resp.status_code < 300:
        return f"GET /function/{name}{path} answered {_quote(resp)}"
    return None


def _digest(image: str) -> str:
    return image.rpartition("@")[2][:19] if "@" in image else image


# --- Argo CD ------------------------------------------------------------------------------


class ArgoCD:
    """Argo CD's REST API (the grpc-gateway in front of its ApplicationService), with a
    bearer token."""

    def __init__(self, server: str, token: str):
        self.server = server.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            resp = self.http.request(method, f"{self.server}{path}", timeout=REQUEST_S, **kwargs)
        except requests.RequestException as e:
            raise Failed(f"Argo CD at {self.server} did not answer: {e}", "infra") from None
        if resp.ok:
            return resp.json()
        message = _argo_message(resp)
        if resp.status_code in (401, 403):
            raise Failed(f"Argo CD refused the token (HTTP {resp.status_code}): {message}",
                         "secrets")  # fmt: skip
        reason = "infra" if resp.status_code >= 500 else "rollout"
        raise Failed(f"Argo CD answered HTTP {resp.status_code}: {message}", reason)

    def application(self, name: str) -> dict:
        return self._request("GET", f"/api/v1/applications/{name}")

    def sync(self, name: str, revision: str, prune: bool) -> dict:
        return self._request("POST", f"/api/v1/applications/{name}/sync",
                             json={"name": name, "revision": revision, "prune": prune})  # fmt: skip


def _argo_message(resp: requests.Response) -> str:
    """The message of a grpc-gateway error body ({error, code, message}), else the body."""
    with contextlib.suppress(ValueError, AttributeError):
        body = resp.json()
        return body.get("message") or body.get("error") or _quote(resp)
    return _quote(resp)


def argocd_token(target: ArgoCDTarget, stage_secrets: dict[str, str]) -> str:
    """The API token: the stage secret it names, or the file's content."""
    if target.token_secret:
        token = stage_secrets.get(target.token_secret)
        if not token:
            raise Failed(f"argocd.token_secret: the stage secret {target.token_secret} is "
                         "empty or was not read", "secrets")  # fmt: skip
        return token
    try:
        token = open(target.token_file).read().strip()  # noqa: SIM115 (one read)
    except OSError as e:
        raise Failed(f"argocd.token_file {target.token_file}: {e.strerror}", "secrets") from None
    if not token:
        raise Failed(f"argocd.token_file {target.token_file} is empty", "secrets")
    return token


def rollout_argocd(target: ArgoCDTarget, revision: str, image: str | None,
                   stage_secrets: dict[str, str], out: BinaryIO,
                   cancel: threading.Event) -> Result:  # fmt: skip
    """Sync the application at `revision` and wait until it is Synced and Healthy there."""
    name = target.application
    record = Deployment(target="argocd", application=name, image=image, revision=revision)
    try:
        api = ArgoCD(target.server, argocd_token(target, stage_secrets))
        before = api.application(name)
        record.previous = ((before.get("status") or {}).get("sync") or {}).get("revision")
        say(out, f"syncing Argo CD application {name} at revision {revision} on {api.server}")
        started = time.monotonic()
        api.sync(name, revision, target.prune)
        seen = _wait(lambda: _not_synced(api, name, record),
                     started + target.timeout, cancel)  # fmt: skip
    except Failed as e:
        say(out, str(e))
        return Result(deployment=record, reason=e.reason, error=str(e))
    if seen is not None:
        error = f"application {name} was not Synced and Healthy at {revision} within " \
                f"{target.timeout}s: {seen}"  # fmt: skip
        say(out, error)
        return Result(deployment=record, reason="rollout", error=error)
    record.healthy_after_s = round(time.monotonic() - started, 3)
    say(out, f"application {name} is Synced and Healthy at {revision} after "
             f"{record.healthy_after_s:.1f}s")  # fmt: skip
    return Result(deployment=record)


def _not_synced(api: ArgoCD, name: str, record: Deployment) -> str | None:
    """None when our sync operation (the one asking for record.revision) has succeeded and
    the application is Synced and Healthy at that revision (HEAD: at the commit the
    operation resolved it to, then recorded); raises Failed for a Degraded application or
    a failed sync operation (Argo CD's message); else the state it is in."""
    revision = record.revision
    status = api.application(name).get("status") or {}
    sync, health = status.get("sync") or {}, status.get("health") or {}
    operation = status.get("operationState") or {}
    phase = operation.get("phase")
    if phase in ("Failed", "Error"):
        raise Failed(f"Argo CD's sync of {name} {phase.lower()}: "
                     f"{operation.get('message') or 'no message'}")  # fmt: skip
    if health.get("status") == "Degraded":
        message = health.get("message") or operation.get("message") or "no message"
        raise Failed(f"application {name} is Degraded: {message}")
    state = (f"sync {sync.get('status')} at {sync.get('revision')}, health "
             f"{health.get('status')}, operation {phase}")  # fmt: skip
    asked = ((operation.get("operation") or {}).get("sync") or {}).get("revision")
    resolved = (operation.get("syncResult") or {}).get("revision")
    at = resolved if revision == "HEAD" else revision
    done = (
        asked == revision
        and phase == "Succeeded"
        and sync.get("status") == "Synced"
        and sync.get("revision") == at
        and health.get("status") == "Healthy"
    )
    if done:
        record.revision = at
    return None if done else state


def promoted_revision(run) -> str:
    """The environment repository's commit the promote stage recorded, else HEAD."""
    with contextlib.suppress(Exception):  # no promote stage, or nothing recorded
        for attempt in reversed(run.stage("promote").attempts):
            promotion = getattr(attempt, "promotion", None) or {}
            commit = (promotion.get("commit") if isinstance(promotion, dict)
                      else getattr(promotion, "commit", None))  # fmt: skip
            if attempt.status == "passed" and commit:
                return commit
    return "HEAD"


def to_record(result: Result) -> dict[str, Any]:
    """The attempt's `deployment` field."""
    return {"deployment": result.deployment.model_dump()}


def deploy(run, spec, out: BinaryIO, cancel: threading.Event,
           stage_secrets: Callable[[], dict[str, str]]) -> Result:  # fmt: skip
    """The deploy stage's rollout of `run` to the target of `spec` (its StageSpec);
    `stage_secrets()` reads the stage's own secrets (an Argo CD token, another gateway's
    password)."""
    from .settings import settings

    if spec.openfaas:
        target = spec.openfaas
        record = Deployment(target="openfaas", function=target.function)
        if not run.image:
            error = "deploy.openfaas: no build stage of this run pushed an image"
            return Result(deployment=record, reason="rollout", error=error)
        platform = settings().gateway_url.rstrip("/")
        gateway = (target.gateway or platform).rstrip("/")
        try:
            if target.password_secret:
                auth = (target.user, stage_secrets()[target.password_secret])
            elif gateway == platform:
                auth = gateway_credentials(settings().secret)
            else:
                raise Failed(f"deploy.openfaas.gateway: {gateway} is not the platform's gateway, "
                             "and the platform's credentials go to its own only: give that "
                             "gateway's password as password_secret, one of the stage's "
                             "secrets", "secrets")  # fmt: skip
        except Failed as e:
            say(out, str(e))
            return Result(deployment=record, reason=e.reason, error=str(e))
        return rollout_openfaas(target, run.image, gateway, auth, out, cancel)
    target = spec.argocd
    values = stage_secrets() if target.token_secret else {}
    return rollout_argocd(target, promoted_revision(run), run.image, values, out, cancel)
