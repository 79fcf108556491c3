"""OpenFaaS's /system API on the local gateway, in the JSON forms of faas-provider's types,
as faas-cli and cron-connector use it:

  GET    /system/functions             FunctionStatus of every deployed function
  POST   /system/functions             deploy (FunctionDeployment); 409 when it exists
  PUT    /system/functions             update; 404 when it does not exist (faas-cli then POSTs)
  DELETE /system/functions             {"functionName"}
  GET    /system/function/<name>       one FunctionStatus
  POST   /system/scale-function/<name> {"serviceName", "replicas"}
  GET    /system/logs?name=&tail=&since=&follow=   newline-delimited logs.Message
  GET|POST|PUT|DELETE /system/secrets  names only, never values; one file each in the
                                       secrets folder
  GET    /system/namespaces, /system/info

Every route needs basic auth with the credentials `faasci up` keeps in the secrets folder
(basic-auth-user, basic-auth-password, as OpenFaaS names them); anything else under
/system answers 501. There is one namespace, openfaas-fn; `?namespace=` may name it.
"""

from __future__ import annotations

import hmac
import json
import os
import platform
import re
import time
from collections import deque
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from flask import Blueprint, Response, jsonify, request
from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from ..errors import Conflict, NotFound, UserError
from ..stack import FunctionSpec
from .provider import Deployment, NotSupported, Provider

NAMESPACE = "openfaas-fn"
AUTH_FILES = ("basic-auth-user", "basic-auth-password")
REALM = 'Basic realm="faas-ci gateway"'
FUNCTION_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"  # a DNS-1123 label, as Kubernetes
SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
FOLLOW_S = 30  # a followed log ends after this long, as faas-cli expects ("up to 30s")
LOG_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")  # logging's asctime
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Unauthorized(UserError):
    status = 401


class Model(BaseModel):
    # JSON keys in camelCase as faas-provider's Go types; unknown keys ignored as Go does.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Resources(Model):
    memory: str = ""
    cpu: str = ""


class FunctionDeployment(Model):
    service: str = Field(pattern=FUNCTION_NAME)
    image: str = ""
    namespace: str = ""
    env_process: str = ""
    env_vars: dict[str, str] | None = None
    constraints: list[str] | None = None
    secrets: list[str] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    limits: Resources | None = None
    requests: Resources | None = None
    read_only_root_filesystem: bool = False

    def spec(self) -> FunctionSpec:
        def resources(r: Resources | None) -> dict[str, str]:
            return {k: v for k, v in (r.model_dump() if r else {}).items() if v}

        return FunctionSpec(
            name=self.service,
            image=self.image,
            env_process=self.env_process,
            environment=self.env_vars or {},
            secrets=self.secrets or [],
            labels=self.labels or {},
            annotations=self.annotations or {},
            limits=resources(self.limits),
            requests=resources(self.requests),
            constraints=self.constraints or [],
            read_only_root_filesystem=self.read_only_root_filesystem,
        )


class DeleteFunction(Model):
    function_name: str = Field(min_length=1)
    namespace: str = ""


class ScaleFunction(Model):
    service_name: str = ""
    namespace: str = ""
    replicas: int = Field(ge=0)


class Secret(Model):
    name: str
    namespace: str = ""
    value: str = ""
    raw_value: Base64Bytes | None = None


def credentials(secrets_dir: Path) -> tuple[str, str] | None:
    """The gateway's (user, password) from the secrets folder; None when not set up."""
    try:
        user, password = ((secrets_dir / name).read_text().strip() for name in AUTH_FILES)
    except OSError:
        return None
    return (user, password) if user and password else None


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def function_status(deployment: Deployment) -> dict:
    """faas-provider's FunctionStatus, plus the local `pid` and `restarts`."""
    fn = deployment.instance
    spec = fn.spec
    return {
        "name": spec.name,
        "image": spec.image,
        "namespace": NAMESPACE,
        "envProcess": spec.env_process,
        "envVars": spec.environment,
        "secrets": spec.secrets,
        "labels": spec.labels,
        "annotations": spec.annotations,
        "limits": spec.limits or None,
        "requests": spec.requests or None,
        "constraints": spec.constraints,
        "readOnlyRootFilesystem": spec.read_only_root_filesystem,
        "createdAt": rfc3339(deployment.created_at),
        "invocationCount": fn.invocations,
        "replicas": deployment.replicas,
        "availableReplicas": 1 if deployment.running and fn.ready() else 0,
        "restarts": fn.restarts,
        "pid": fn.proc.pid if fn.proc else None,
    }


def parse(model: type[Model]) -> Model:
    """The JSON body as `model`; 400 naming the first bad field."""
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise UserError("the body is not a JSON object", "body")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]  # its message only: an input may be a secret's value
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise UserError(f"{where}: {first['msg']}", where) from None


def check_namespace(namespace: str | None) -> None:
    if namespace not in (None, "", NAMESPACE):
        raise UserError(
            f"namespace {namespace!r} is not valid: there is only {NAMESPACE}", "namespace"
        )


def blueprint(provider: Provider) -> Blueprint:
    api = Blueprint("openfaas", __name__, url_prefix="/system")
    secrets_dir = provider.cfg.secrets_dir

    @api.errorhandler(UserError)
    def user_error(e: UserError):
        resp = jsonify(e.body())
        resp.status_code = e.status
        if e.status == 401:
            resp.headers["WWW-Authenticate"] = REALM
        return resp

    @api.before_request
    def basic_auth() -> None:
        expected = credentials(secrets_dir)
        if expected is None:
            raise Unauthorized(f"no gateway credentials in {secrets_dir} ({', '.join(AUTH_FILES)})")
        auth = request.authorization
        if auth is None or auth.type != "basic":
            raise Unauthorized("basic auth required: run faas-cli login", "Authorization")
        # Both compared, each in constant time, so timing tells nothing about either.
        user_ok = hmac.compare_digest((auth.username or "").encode(), expected[0].encode())
        password_ok = hmac.compare_digest((auth.password or "").encode(), expected[1].encode())
        if not (user_ok and password_ok):
            raise Unauthorized("invalid credentials", "Authorization")
        check_namespace(request.args.get("namespace"))
        if request.method == "OPTIONS":  # Flask would answer it for every route
            raise NotSupported(f"OPTIONS {request.path} is not supported by this gateway")

    @api.get("/functions")
    def list_functions():
        return jsonify([function_status(d) for d in list(provider.functions.values())])

    @api.get("/function/<name>")
    def one_function(name: str):
        return jsonify(function_status(provider.get(name)))

    @api.post("/functions")
    @api.put("/functions")
    def deploy():
        deployment = parse(FunctionDeployment)
        check_namespace(deployment.namespace)
        if reserved := sorted(set(deployment.secrets or ()) & set(AUTH_FILES)):
            raise UserError(f"secret {reserved[0]!r} is the gateway's, not a function's", "secrets")
        provider.deploy(deployment.spec(), update=request.method == "PUT")
        return Response(status=202)

    @api.delete("/functions")
    def remove():
        body = parse(DeleteFunction)
        check_namespace(body.namespace)
        provider.remove(body.function_name)
        return Response(status=202)

    @api.post("/scale-function/<name>")
    def scale(name: str):
        body = parse(ScaleFunction)
        check_namespace(body.namespace)
        if body.service_name not in ("", name):
            raise UserError(f"serviceName {body.service_name!r} is not {name!r}", "serviceName")
        provider.scale(name, body.replicas)
        return Response(status=202)

    @api.get("/namespaces")
    def namespaces():
        return jsonify([NAMESPACE])

    @api.get("/info")
    def info():
        version = {"sha": "", "release": release()}
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        return jsonify({
            "provider": {"provider": "faas-ci-local", "orchestration": provider.orchestration,
                         "version": version},
            "version": version,
            "arch": arch,
        })  # fmt: skip

    @api.get("/secrets")
    def list_secrets():
        names = sorted(p.name for p in secrets_dir.iterdir() if is_listed(p))
        return jsonify([{"name": name, "namespace": NAMESPACE} for name in names])

    @api.post("/secrets")
    @api.put("/secrets")
    def write_secret():
        secret = parse(Secret)
        check_namespace(secret.namespace)
        path = secret_path(secret.name)
        data = secret.raw_value if secret.raw_value is not None else secret.value.encode()
        if request.method == "POST":
            try:  # O_EXCL: of two creations at once, one gets 409
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise Conflict(f"secret {secret.name!r} already exists", "name") from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return Response(status=201)
        if not path.is_file():
            raise NotFound(f"secret {secret.name!r} not found", "name")
        partial = path.with_name(f".{secret.name}.partial")  # hidden: never listed
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        os.replace(partial, path)
        return Response(status=200)

    @api.delete("/secrets")
    def remove_secret():
        secret = parse(Secret)
        check_namespace(secret.namespace)
        try:
            secret_path(secret.name).unlink()
        except FileNotFoundError:
            raise NotFound(f"secret {secret.name!r} not found", "name") from None
        return Response(status=200)

    def secret_path(name: str) -> Path:
        if not SECRET_NAME.fullmatch(name) or len(name) > 253:
            raise UserError(
                f"secret name {name!r} is not valid: lowercase letters, digits, '-' and '.'",
                "name",
            )
        if name in AUTH_FILES:  # the gateway's own, in OpenFaaS's openfaas namespace
            raise UserError(f"secret {name!r} is reserved for the gateway", "name")
        return secrets_dir / name

    def is_listed(path: Path) -> bool:
        return (
            path.is_file()
            and bool(SECRET_NAME.fullmatch(path.name))
            and (path.name not in AUTH_FILES)
        )

    @api.get("/logs")
    def logs():
        args = request.args
        name = args.get("name") or ""
        if not name:
            raise UserError("name (the function) is required", "name")
        provider.get(name)
        try:
            tail = int(args.get("tail") or 0)
        except ValueError:
            raise UserError(f"tail {args['tail']!r} is not an integer", "tail") from None
        try:
            since = datetime.fromisoformat(args["since"]) if args.get("since") else None
        except ValueError:
            raise UserError(f"since {args['since']!r} is not an RFC 3339 time", "since") from None
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        follow = args.get("follow", "").lower() in ("1", "t", "true")
        gone = request.environ.get("waitress.client_disconnected", lambda: False)
        path = provider.cfg.logs / f"{name}.log"
        lines = log_messages(path, name, since, tail, follow, gone)
        return Response(lines, mimetype="application/x-ndjson")

    @api.route("", methods=ALL_METHODS, provide_automatic_options=False)
    @api.route("/<path:rest>", methods=ALL_METHODS, provide_automatic_options=False)
    def unsupported(rest: str = ""):
        raise NotSupported(f"{request.method} {request.path} is not supported by this gateway")

    return api


def release() -> str:
    try:
        return metadata.version("faasci")
    except metadata.PackageNotFoundError:
        return "dev"


def log_messages(path: Path, name: str, since, tail: int, follow: bool, gone=lambda: False):
    """The function's log as logs.Message lines (JSON, one a line). A line's time is its
    own logging timestamp, else that of the line before it; `tail` keeps the last lines;
    `follow` then streams what is appended, for up to FOLLOW_S or until the client is gone."""
    if not path.exists():
        return
    last = datetime.fromtimestamp(path.stat().st_mtime, UTC)

    def message(line: str) -> str | None:
        nonlocal last
        if m := LOG_STAMP.match(line):
            last = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").astimezone(UTC)
        if since is not None and last < since:
            return None
        text = line.rstrip("\n")
        return json.dumps({"name": name, "namespace": NAMESPACE, "instance": f"{name}-local",
                           "timestamp": rfc3339(last), "text": text}) + "\n"  # fmt: skip

    with path.open(errors="replace") as log:
        yield from deque(filter(None, map(message, log)), maxlen=tail if tail > 0 else None)
        deadline = time.monotonic() + FOLLOW_S
        partial = ""
        while follow and time.monotonic() < deadline and not gone():
            partial += log.readline()
            if not partial.endswith("\n"):  # nothing new, or a line still being written
                time.sleep(0.3)
            elif m := message(partial):
                partial = ""
                yield m
            else:
                partial = ""
