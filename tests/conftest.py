"""Fixtures shared by every test: git repositories made on the spot, and the real local
stack (NATS, SeaweedFS S3, the gateway and every function) started once per session on
ports of its own, so a developer's stack on the default ports is left alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "sample-service"
FAASCI = str(Path(sys.executable).parent / "faasci")  # the CLI of this environment
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost",
}  # fmt: skip


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV})  # fmt: skip
    return done.stdout.strip()


def commit_all(repo: Path, message: str = "change") -> str:
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def callback_receiver():
    """An HTTP server on 127.0.0.1 recording every POST: (its URL, a queue of (headers, body))."""
    import queue
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = queue.Queue()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.put((dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    # On a port of its own: the test stack allows X-Callback-Url to it (FAASCI_CALLBACK_ALLOW).
    server = ThreadingHTTPServer(("127.0.0.1", CALLBACK_PORT), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/done", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def nats_bus(tmp_path):
    """A Bus connected to a NATS server (JetStream, file storage) of this test's own."""
    import socket
    import sys
    import time

    from faasci.bus import Bus

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "nats-server"), "-js", "-a", "127.0.0.1",
         "-p", str(port), "-sd", str(tmp_path / "nats")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.05)
    bus = Bus(f"nats://127.0.0.1:{port}")
    yield bus
    bus.close()
    server.kill()
    server.wait()


@pytest.fixture
def outside():
    """A folder both the test and stage commands see (a stage's /tmp is its own)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="faasci-test-") as folder:
        yield Path(folder)


@pytest.fixture
def make_repo(tmp_path):
    """Make a committed git repository from {relative path: text}; returns its path."""
    counter = iter(range(1000))

    def make(files: dict[str, str], name: str | None = None) -> Path:
        repo = tmp_path / (name or f"repo{next(counter)}")
        for rel, text in files.items():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            (repo / rel).write_text(text)
        git(repo, "init", "--quiet", "--initial-branch=main")
        commit_all(repo, "initial")
        return repo

    return make


# Real projects nobody here wrote (../shared/corpus, or FAASCI_CORPUS): `git archive` tarballs
# of one folder each.
CORPUS = Path(os.environ.get("FAASCI_CORPUS") or ROOT.parent / "shared" / "corpus")
CORPUS_PROJECTS = ("blinker", "markupsafe", "structlog", "mime-types")


def corpus_repo(name: str, parent: Path, as_name: str | None = None) -> Path:
    """A corpus project unpacked into `parent` (as `as_name`), `git init` and committed."""
    import tarfile

    tarball = CORPUS / f"{name}.tar.gz"
    if not tarball.exists():
        pytest.fail(f"no corpus at {CORPUS}: the verdict tests need it (FAASCI_CORPUS)")
    unpacked = parent / f".unpack-{as_name or name}"
    with tarfile.open(tarball) as tar:
        tar.extractall(unpacked, filter="data")
    repo = (unpacked / name).rename(parent / (as_name or name))
    unpacked.rmdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, f"{name} as shipped")
    return repo


def copy_sample(parent: Path) -> Path:
    """A committed copy of examples/sample-service as a repository of its own, in `parent`."""
    repo = parent / "sample-service"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "sample service")
    return repo


@pytest.fixture
def sample_repo(tmp_path) -> Path:
    """A committed copy of examples/sample-service as a repository of its own."""
    return copy_sample(tmp_path)


# FAASCI_TEST_PORT_OFFSET moves every port (and the test stack's folder) a test session
# uses, so two sessions can run side by side on one machine.
PORT_OFFSET = int(os.environ.get("FAASCI_TEST_PORT_OFFSET", "0"))
# `faasci up` records the stack it started in the user's configuration: the tests' own.
os.environ.setdefault(
    "FAASCI_CONFIG", str(ROOT / ".faasci" / f"test{PORT_OFFSET or ''}-user-config.json")
)


def stack_ports(gateway: int, nats: int, s3: int) -> dict[str, str]:
    """The environment placing a stack's gateway, NATS and S3 on these ports (plus the offset),
    and its OIDC provider, Vault and image registry beside the gateway."""
    return {
        "OPENFAAS_URL": f"http://127.0.0.1:{gateway + PORT_OFFSET}",
        "FAASCI_NATS_PORT": str(nats + PORT_OFFSET),
        "FAASCI_S3_PORT": str(s3 + PORT_OFFSET),
        # The OIDC provider and Vault beside the gateway: 28444 and 28200 for its 28080.
        "FAASCI_OIDC_PORT": str(gateway + 364 + PORT_OFFSET),
        "FAASCI_VAULT_PORT": str(gateway + 120 + PORT_OFFSET),
        # The registry as 5000 is to 8080: 25000 for 28080 (26000-28000 for the e2e stacks).
        "FAASCI_REGISTRY_PORT": str(gateway - 3080 + PORT_OFFSET),
        # git daemon as 9418 is to 8080: 29418 for 28080.
        "FAASCI_GIT_PORT": str(gateway + 1338 + PORT_OFFSET),
        # Prometheus: 29130 for 28080 (clear of the functions, gateway+1 and up, of the
        # stack on the next thousand).
        "FAASCI_PROMETHEUS_PORT": str(gateway + 1050 + PORT_OFFSET),
        # Jaeger (up --observe): OTLP/HTTP 24318 and UI/API 26686 (query gRPC 26685) for
        # 28080, clear of every other stack's ports.
        "FAASCI_JAEGER_OTLP_PORT": str(gateway - 3762 + PORT_OFFSET),
        "FAASCI_JAEGER_UI_PORT": str(gateway - 1394 + PORT_OFFSET),
    }


# Ports of the test stack: NATS 24222 (monitor 28222), S3 28333 (SeaweedFS 28334-28346),
# gateway 28080 with the functions on 28081 and up, OIDC 28444, Vault 28200, registry 25000.
TEST_STACK_ENV = stack_ports(28080, 24222, 28333)
TEST_STACK_HOME = ROOT / ".faasci" / f"test{PORT_OFFSET or ''}"
CALLBACK_PORT = 28070 + PORT_OFFSET  # callback_receiver's; the test stack's callbacks go there
# the default (the stack's own functions) and the receiver
TEST_STACK_ENV["FAASCI_CALLBACK_ALLOW"] = (
    f"{TEST_STACK_ENV['OPENFAAS_URL']}/function/ http://127.0.0.1:{CALLBACK_PORT}/"
)


@pytest.fixture(scope="session")
def scheduled_repo(tmp_path_factory) -> Path:
    """The repository the test stack's cron schedule runs (SCHEDULED_REPOS)."""
    repo = tmp_path_factory.mktemp("scheduled") / "sample-service"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "scheduled sample")
    return repo


@pytest.fixture(scope="session")
def webhook_repo(tmp_path_factory) -> Path:
    """The repository signed pushes may start runs of on the test stack (WEBHOOK_REPOS:
    its branch main and tags v*)."""
    repo = tmp_path_factory.mktemp("webhook") / "sample-service"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".*_cache"))
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit_all(repo, "webhook sample")
    return repo


@pytest.fixture(scope="session")
def slack():
    """A local Slack (tests/slack_fake.py) that the test stack's notifier posts to."""
    from slack_fake import SlackFake

    with SlackFake() as fake:
        yield fake


@contextlib.contextmanager
def started(cfg):
    """`cfg`'s local stack, started afresh (its scratch space too: an earlier session's
    node-local cache would give hits), then stopped and its scratch space removed (it is
    in memory: not to be left to the machine's next user)."""
    from faasci.local import control
    from faasci.stage import remove_tree

    control.down(cfg, say=lambda *_: None)  # whatever an interrupted session left running
    remove_tree(cfg.workdir)
    try:
        control.up(cfg, say=lambda *_: None)
        yield cfg
    finally:
        control.down(cfg, say=lambda *_: None)
        remove_tree(cfg.workdir)


def stopped(env: dict) -> None:
    """`faasci down` of a stack the CLI started with `env`, and its scratch space removed
    (as started() does)."""
    from faasci.local.config import scratch_of
    from faasci.stage import remove_tree

    subprocess.run([FAASCI, "down"], env=env, capture_output=True, timeout=180)
    remove_tree(scratch_of(Path(env["FAASCI_HOME"]).resolve()))


@pytest.fixture(scope="session")
def stack(scheduled_repo, webhook_repo, slack, tmp_path_factory):
    """The real local stack, started afresh once for the session in .faasci/test/, its
    notifier pointed at the local Slack."""
    from faasci.local import control
    from faasci.local.config import LocalConfig

    home = TEST_STACK_HOME
    env = {
        **TEST_STACK_ENV,
        "FAASCI_STACK": str(ROOT / "stack.yml"),
        "FAASCI_HOME": str(home),
        "FAASCI_SECRETS_DIR": str(home / "secrets"),
        "SCHEDULED_REPOS": str(scheduled_repo),
        "FAASCI_OBSERVE": "1",  # `up --observe`: Jaeger and Prometheus beside it
        # and, as a pattern, the cache tests' repositories (tmp_path/cache-<name>)
        "WEBHOOK_REPOS": f"{webhook_repo}#main,refs/tags/v* "
        f"{tmp_path_factory.getbasetemp()}/*/cache-*",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cfg = LocalConfig.from_env()
    control.down(cfg, say=lambda *_: None)  # whatever an interrupted session left running
    shutil.rmtree(home, ignore_errors=True)
    cfg.secrets_dir.mkdir(parents=True)
    (cfg.secrets_dir / "slack-webhook-url").write_text(slack.webhook_url)
    try:
        with started(cfg):
            yield cfg
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def token(stack):
    """token(role) -> a bearer token from the test stack's OIDC provider for the client
    test-<role> (viewer, runner, admin, or none: a token without roles)."""
    from faasci.local import oidc

    return lambda role: oidc.token(stack, f"test-{role}")


@pytest.fixture(scope="session")
def gateway(stack, token):
    """A client of the test stack's gateway: an admin's token on every invocation, the
    gateway's basic auth on /system/*."""
    from faasci.invoke import Gateway
    from faasci.local.control import system_auth

    return Gateway(stack.gateway_url, timeout=120, token=lambda: token("admin"),
                   system_auth=system_auth(stack))  # fmt: skip


@pytest.fixture(scope="session")
def client_settings(stack):
    """Library settings pointing at the test stack's NATS and S3, as a function sees them."""
    from faasci import services, settings
    from faasci.local.control import client_settings

    value = client_settings(stack)
    settings.configure(value)
    services.reset()
    yield value
    settings.configure(None)
    services.reset()


@pytest.fixture(scope="session")
def engine_with_base(stack):
    """The stack's container engine running, with the offline base image; its name."""
    from faasci.local.engine import Engine

    engine = Engine.for_stack(stack)
    engine.start()
    return engine.ensure_base_image(say=lambda *_: None)


def log_of(gateway, run_id: str, stage: str, attempt: int = 1) -> str:
    """The stored log of one attempt of a stage, as pipeline-log serves it."""
    return gateway.call("pipeline-log", method="GET", path=f"{run_id}/{stage}/{attempt}").text


def start_run(gateway, repo: Path) -> str:
    """POST /function/runs for the repository `repo`; the new run's id."""
    resp = gateway.call("runs", {"repo": str(repo)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def wait_for_run(gateway, run_id: str, timeout: float = 120) -> dict:
    """Poll the runs function until the run has finished; its final record."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        run = gateway.call("runs", method="GET", path=run_id).json()
        if run["status"] in ("passed", "failed", "cancelled"):
            return run
        assert time.monotonic() < deadline, f"still {run_summary(run)}"
        time.sleep(0.3)


def run_summary(run: dict) -> str:
    """A run's state on one line: each stage's status and its attempts' statuses."""
    stages = [f"{s['name']} {s['status']}" + (f" ({', '.join(a['status'] for a in s['attempts'])})"
                                              if s["attempts"] else "")
              for s in run["stages"]]  # fmt: skip
    return f"run {run['id']} {run['status']}: {'; '.join(stages)}"


STACK_LOG_LINES = 8  # per log file, in a failed test's report
PROBLEMS = ("WARNING", "ERROR", "CRITICAL", "Traceback")
_log_sizes = pytest.StashKey[dict]()


def pytest_runtest_setup(item):
    """Where the test stack's logs end as a test starts (stack_problems reads from there)."""
    logs = (TEST_STACK_HOME / "logs").glob("*.log")
    item.stash[_log_sizes] = {log: log.stat().st_size for log in logs}


def stack_problems(home: Path, sizes: dict[Path, int]) -> str:
    """The warning and error lines a stack's processes logged since `sizes` were taken (or
    ever), the last few of each log: what a failed end-to-end test shows of the stack, so
    a CI log says why without the stack's files."""
    found = []
    for log in sorted((home / "logs").glob("*.log")):
        with log.open("rb") as f:
            f.seek(max(sizes.get(log, 0), log.stat().st_size - 256 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
        bad = [line[:300] for line in lines if any(w in line for w in PROBLEMS)]
        if bad:
            found.append(f"--- {log.name}\n" + "\n".join(bad[-STACK_LOG_LINES:]))
    return "\n".join(found)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test reports the warnings its stacks logged meanwhile: the test stack's,
    when it used it, and those of a stack of its own (FAASCI_HOME set for the test)."""
    report = yield
    if not report.failed:
        return report
    homes = {}
    if "stack" in item.fixturenames:
        homes[TEST_STACK_HOME] = item.stash.get(_log_sizes, {})
    if (own := os.environ.get("FAASCI_HOME")) and Path(own) != TEST_STACK_HOME:
        homes[Path(own)] = {}
    for home, sizes in homes.items():
        if text := stack_problems(home, sizes):
            report.sections.append((f"warnings and errors of the stack in {home}", text))
    return report


@contextlib.contextmanager
def registry_of_its_own(home: Path, port: int):
    """A registry started as `faasci up` starts it, for a stack whose home is `home`, on
    `port`; its stack's LocalConfig; stopped afterwards."""
    from faasci.local import processes, services
    from faasci.local.config import LocalConfig

    with pytest.MonkeyPatch.context() as env:
        env.setenv("FAASCI_HOME", str(home))
        env.setenv("FAASCI_REGISTRY_PORT", str(port))
        env.setenv("OPENFAAS_URL", "http://127.0.0.1:1")  # no gateway: never a developer's
        cfg = LocalConfig.from_env(ROOT / "stack.yml")
    assert cfg.registry == f"127.0.0.1:{port}"
    try:
        assert services.start_registry(cfg, dict(os.environ)), "a registry was running already"
        yield cfg
    finally:
        processes.stop(cfg.run, "registry")


def free_port_pair() -> int:
    """A free port on 127.0.0.1 whose next port is free too."""
    import socket

    while True:
        with socket.socket() as s, socket.socket() as t:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


@pytest.fixture(scope="session")
def openbao(tmp_path_factory):
    """A real OpenBao server of the session's own (its data in a temporary folder, on free
    ports), prepared as `faasci up` prepares the stack's: KV v2 at secret/, the functions'
    AppRoles (ids in `openbao.secrets_dir`), the platform secrets seeded. Yields the
    faasci.local.openbao.OpenBao, with `secrets_dir` and `root` (a root hvac client)."""
    from types import SimpleNamespace

    from faasci.local.openbao import OpenBao

    folder = tmp_path_factory.mktemp("openbao")
    # Raft's cluster address takes the next port.
    bao = OpenBao(storage=folder / "data", keys_dir=folder / "keys", port=free_port_pair())
    bao.start(folder / "run", folder / "logs", dict(os.environ))
    try:
        root = bao.prepare(folder / "secrets")
        yield SimpleNamespace(server=bao, url=bao.url, secrets_dir=folder / "secrets", root=root)
    finally:
        bao.stop(folder / "run")


@pytest.fixture
def vault_settings(openbao, tmp_path):
    """Settings of a function logging in to `openbao` with the functions' AppRole (a copy
    of the secrets folder of its own); faasci.vault's client and cache reset around."""
    from dataclasses import replace

    from faasci import settings, vault

    # Outside /tmp, which a stage's sandbox replaces with its own anyway.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="faasci-secrets-") as folder:
        secrets_dir = Path(folder) / "secrets"
        shutil.copytree(openbao.secrets_dir, secrets_dir)
        value = replace(settings.Settings(), vault_addr=openbao.url, secrets_dir=secrets_dir,
                        workdir=tmp_path / "work", workspace=tmp_path / "ws")  # fmt: skip
        settings.configure(value)
        vault.reset()
        yield value
        settings.configure(None)
        vault.reset()


@pytest.fixture(scope="session")
def webhook(stack, client_settings):
    """send(body, event="push", headers=None) -> the webhook function's answer to `body` as
    GitHub delivers it: signed with the stack's webhook secret (read from its OpenBao, as
    the function does), a fresh delivery id, no token of ours. `send.secret` is the secret."""
    import hashlib
    import hmac
    import json
    import uuid
    from dataclasses import replace

    import requests

    from faasci import settings, vault

    settings.configure(replace(client_settings, vault_addr=stack.vault_url))
    vault.reset()
    try:
        secret = vault.platform_secret("webhook-secret")[0]
    finally:
        settings.configure(client_settings)
        vault.reset()

    def send(body, event: str = "push", headers: dict | None = None) -> requests.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        signature = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        signed = {"Content-Type": "application/json", "X-GitHub-Event": event,
                  "X-GitHub-Delivery": str(uuid.uuid4()),
                  "X-Hub-Signature-256": f"sha256={signature}", **(headers or {})}  # fmt: skip
        return requests.post(f"{stack.gateway_url}/function/webhook", data=raw,
                             headers={k: v for k, v in signed.items() if v is not None},
                             timeout=120)  # fmt: skip

    send.secret = secret
    return send


# GitOps: environment repositories served over a real git remote (git daemon on 127.0.0.1).

ENV_FILES = {
    "staging/values.yaml": "# Helm values of staging\nreplicaCount: 1\nimage:\n"
    "  repository: registry.invalid/placeholder  # set by faas-ci\n  pullPolicy: IfNotPresent\n",
    "production/kustomization.yaml": "apiVersion: kustomize.config.k8s.io/v1beta1\n"
    "kind: Kustomization\nresources:\n  - deployment.yaml\nimages:\n  - name: placeholder\n"
    "    newTag: latest\n",
    "production/deployment.yaml": "# the manifests kustomize renders\n",
}


@pytest.fixture(scope="session")
def git_daemon(tmp_path_factory):
    """The real `git daemon` serving every bare repository under its base folder, pushes
    allowed (receive-pack), on a free port of 127.0.0.1: (base folder, URL prefix)."""
    import socket
    import time
    from types import SimpleNamespace

    base = tmp_path_factory.mktemp("git-daemon")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = subprocess.Popen(
        ["git", "daemon", "--export-all", "--enable=receive-pack", "--reuseaddr",
         "--informative-errors", f"--base-path={base}", "--listen=127.0.0.1", f"--port={port}",
         str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert daemon.poll() is None and time.monotonic() < deadline, "git daemon did not start"
        time.sleep(0.05)
    yield SimpleNamespace(base=base, url=f"git://127.0.0.1:{port}")
    daemon.terminate()
    daemon.wait(timeout=10)


def new_env_repo(daemon, name: str, files: dict[str, str] | None = None):
    """A bare repository `name` served by `daemon`, its branch main holding `files`
    (ENV_FILES by default); force pushes refused and every update of main logged, so a
    test can tell the history only ever moved forward. (URL, bare repository path)."""
    from types import SimpleNamespace

    seed = daemon.base / f".seed-{name}"
    for rel, text in (ENV_FILES if files is None else files).items():
        (seed / rel).parent.mkdir(parents=True, exist_ok=True)
        (seed / rel).write_text(text)
    git(seed, "init", "--quiet", "--initial-branch=main")
    commit_all(seed, "environments")
    bare = daemon.base / name
    subprocess.run(["git", "clone", "--quiet", "--bare", str(seed), str(bare)], check=True)
    shutil.rmtree(seed)
    git(bare, "config", "receive.denyNonFastForwards", "true")
    git(bare, "config", "core.logAllRefUpdates", "always")
    return SimpleNamespace(url=f"{daemon.url}/{name}", path=bare)


@pytest.fixture
def env_repo(git_daemon):
    """A fresh environment repository (staging Helm values, a production kustomization)
    served by the real git daemon: `.url` (git://127.0.0.1:PORT/…), `.path` (the bare repo)."""
    import uuid

    return new_env_repo(git_daemon, f"envs-{uuid.uuid4().hex[:8]}.git")
