"""A local stand-in for Argo CD's API server, which needs Kubernetes and cannot run here.
It speaks the documented REST forms of Argo CD's ApplicationService (the grpc-gateway in
front of argocd-server) that faasci.rollout uses, with the same states:

  GET  /api/v1/applications/{name}        -> v1alpha1.Application:
       {metadata: {name, namespace}, spec: {project, source: {repoURL, path,
        targetRevision}, destination}, status: {sync: {status: Synced|OutOfSync,
        revision}, health: {status: Healthy|Progressing|Degraded, message},
        operationState: {operation: {sync: {revision}}, phase:
        Running|Succeeded|Failed|Error, message, syncResult: {revision}}}}
  POST /api/v1/applications/{name}/sync   body: application.ApplicationSyncRequest
       {name, revision, prune, dryRun, strategy, resources, ...} -> the Application
  every request: `Authorization: Bearer <token>` (an API token of an account, `argocd
       account generate-token`); without a valid one 401 with the grpc-gateway's error
       body {error, code: 16 (Unauthenticated), message}; an unknown application 404
       {error, code: 5 (NotFound), message}.

Sources: Argo CD's API docs (argo-cd.readthedocs.io, "Developer Guide > API Docs": the
Swagger at /swagger-ui of every server, and `curl $ARGOCD_SERVER/api/v1/applications -H
"Authorization: Bearer $ARGOCD_TOKEN"`); the OpenAPI document assets/swagger.json in
argoproj/argo-cd (operations ApplicationService_Get and ApplicationService_Sync, the
definition applicationApplicationSyncRequest); and the types in
pkg/apis/application/v1alpha1/types.go (SyncStatusCode Synced/OutOfSync/Unknown,
OperationPhase Running/Terminating/Failed/Error/Succeeded) with gitops-engine's
health.HealthStatusCode (Healthy/Progressing/Degraded/Suspended/Missing/Unknown).

What happens after a sync is scripted per application (`plan`): a list of (sync status,
health status, operation phase, message) the application passes through, one step per GET,
the last one kept. The revision a sync asks for (HEAD resolves to `head`) is what it
reports once Synced.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTE = re.compile(r"^/api/v1/applications/([a-z0-9][-a-z0-9.]*)(/sync)?$")


@dataclass
class Step:
    sync: str  # Synced | OutOfSync
    health: str  # Healthy | Progressing | Degraded
    phase: str  # Running | Succeeded | Failed
    message: str = ""


PROGRESSING_THEN_HEALTHY = [
    Step("OutOfSync", "Healthy", "Running", "waiting for the sync to start"),
    Step("Synced", "Progressing", "Running", "Deployment inventory: 0 of 1 updated replicas"),
    Step("Synced", "Progressing", "Succeeded", "successfully synced (all tasks run)"),
    Step("Synced", "Healthy", "Succeeded", "successfully synced (all tasks run)"),
]
DEGRADED = [
    Step("Synced", "Progressing", "Running", "waiting for healthy state"),
    Step(
        "Synced", "Degraded", "Succeeded", 'Deployment "inventory" exceeded its progress deadline'
    ),  # fmt: skip
]
SYNC_FAILED = [
    Step("OutOfSync", "Healthy", "Running", "syncing"),
    Step(
        "OutOfSync",
        "Healthy",
        "Failed",
        'one or more objects failed to apply, reason: Deployment.apps "inventory" is '
        "invalid: spec.template.spec.containers[0].image: Required value",
    ),  # fmt: skip
]


@dataclass
class App:
    name: str
    revision: str  # what it is synced at now
    plan: list[Step] = field(default_factory=lambda: list(PROGRESSING_THEN_HEALTHY))
    step: int | None = None  # where in the plan after the last sync; None: none yet
    wanted: str | None = None  # the revision the last sync asked for
    syncs: list[dict] = field(default_factory=list)  # the SyncRequest bodies received

    def body(self, head: str) -> dict:
        status: dict = {"sync": {"status": "Synced", "revision": self.revision},
                        "health": {"status": "Healthy"}}  # fmt: skip
        if self.step is not None:
            now = self.plan[min(self.step, len(self.plan) - 1)]
            self.step += 1
            resolved = head if self.wanted == "HEAD" else self.wanted
            synced = now.sync == "Synced"
            if synced:
                self.revision = resolved
            status = {
                "sync": {"status": now.sync, "revision": self.revision},
                "health": {"status": now.health,
                           **({"message": now.message} if now.health == "Degraded" else {})},
                "operationState": {
                    "operation": {"sync": {"revision": self.wanted}},
                    "phase": now.phase,
                    "message": now.message,
                    "syncResult": {"revision": resolved},
                },
            }  # fmt: skip
        return {
            "metadata": {"name": self.name, "namespace": "argocd"},
            "spec": {
                "project": "default",
                "source": {
                    "repoURL": "https://git.example.com/envs.git",
                    "path": self.name,
                    "targetRevision": "HEAD",
                },  # fmt: skip
                "destination": {
                    "server": "https://kubernetes.default.svc",
                    "namespace": self.name,
                },  # fmt: skip
            },
            "status": status,
        }


class ArgoCDFake:
    """`with ArgoCDFake() as argo:` serves on 127.0.0.1 (argo.url); argo.token is the API
    token it accepts; argo.add(name, plan=...) makes an application."""

    def __init__(self, token: str | None = None):
        self.token = token or secrets.token_urlsafe(16)
        self.head = secrets.token_hex(20)  # what HEAD resolves to in the environment repo
        self.apps: dict[str, App] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake._serve(self, "GET")

            def do_POST(self):
                fake._serve(self, "POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def add(self, name: str, plan: list[Step] | None = None, revision: str = "0" * 40) -> App:
        app = App(name, revision, list(plan or PROGRESSING_THEN_HEALTHY))
        self.apps[name] = app
        return app

    def __enter__(self) -> ArgoCDFake:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, h: BaseHTTPRequestHandler, method: str) -> None:
        auth = h.headers.get("Authorization")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append((method, h.path, auth))
            if auth != f"Bearer {self.token}":
                return self._error(h, 401, 16, "no session information")
            found = ROUTE.match(h.path.split("?")[0])
            if not found or (method == "POST") != bool(found[2]):
                return self._error(h, 404, 5, f"{method} {h.path}: no such route")
            app = self.apps.get(found[1])
            if app is None:
                message = f'applications.argoproj.io "{found[1]}" not found'
                return self._error(h, 404, 5, message)
            if method == "POST":
                try:
                    request = json.loads(body or b"{}")
                except ValueError:
                    return self._error(h, 400, 3, "invalid character in the request body")
                app.syncs.append(request)
                app.wanted, app.step = request.get("revision") or "HEAD", 0
            self._json(h, 200, app.body(self.head))

    def _error(self, h, status: int, code: int, message: str) -> None:
        self._json(h, status, {"error": message, "code": code, "message": message})

    def _json(self, h, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)
