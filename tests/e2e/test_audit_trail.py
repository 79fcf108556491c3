"""The audit trail on the real local stack: `faasci audit` lists each trigger with who did
it (a person's token subject, the platform itself), and the trail cannot be removed by any
NATS client, a stage's commands among them."""

import asyncio
import getpass
import json
import os
import subprocess
import time

import nats
import pytest
import requests
from conftest import FAASCI, wait_for_run

from faasci import audit
from faasci.local.cron import CRON_HEADERS


def faasci(*args: str) -> str:
    done = subprocess.run([FAASCI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "400"})  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


def trail(*args: str) -> list[dict]:
    return json.loads(faasci("audit", "--json", *args))


def pipeline(make_repo, stages: str):
    return make_repo({".faasci.yml": f"service: audited\nstages:\n{stages}"})


def test_audit_lists_start_cancel_retry_and_purge_with_their_actors(gateway, make_repo, outside):
    me = f"user:{getpass.getuser()}"
    # run.start from the CLI, as the local user; its stage fails once, then passes (a retry)
    count = outside / "count"
    repo = pipeline(make_repo, f"""\
  unit:
    run: ["n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}; test $n -ge 1"]
    retries: 1
    retry_on: [exit]
    backoff: {{initial_s: 0.2}}
""")  # fmt: skip
    run_id = faasci("run", str(repo), "--detach").strip()
    assert wait_for_run(gateway, run_id)["status"] == "passed"

    # run.start over HTTP with the test admin's token, then run.cancel
    slow = pipeline(make_repo, '  unit:\n    run: ["sleep 60"]\n')
    cancelled = gateway.call("runs", {"repo": str(slow)}).json()["id"]
    faasci("cancel", cancelled)
    assert wait_for_run(gateway, cancelled)["status"] == "cancelled"

    # cache.purge by the CLI's user
    faasci("cache", "purge", "--service", "audited-nothing-to-purge")

    # a person continuing the (finished) run at a stage: refused, and recorded
    assert gateway.call("unit", {"run_id": run_id}).status_code == 409

    entries = trail("--run", run_id)
    assert [e["action"] for e in entries] == ["run.start", "stage.retry", "stage.continue"]
    start, retry, continued = entries
    assert continued["actor"].startswith("user:") and continued["detail"]["stage"] == "unit"
    assert start["actor"] == me and start["detail"] == {"trigger": "cli"}
    assert start["repo"] == str(repo) and start["ref"] and len(start["commit"]) == 40
    assert retry["detail"]["stage"] == "unit" and retry["detail"]["attempt"] == 2

    other = trail("--run", cancelled)
    assert [e["action"] for e in other] == ["run.start", "run.cancel"]
    assert other[0]["actor"].startswith("user:") and other[0]["detail"] == {"trigger": "http"}
    assert other[1]["actor"] == me

    recent = trail("--since", "10m")
    purge = [e for e in recent if e["action"] == "cache.purge"][-1]
    assert purge["actor"] == me and purge["detail"]["service"] == "audited-nothing-to-purge"

    table = faasci("audit", "--run", cancelled)  # the rich table
    assert "run.start" in table and "run.cancel" in table and me in table

    # filters that match nothing, and bad ones
    assert trail("--since", "2099-01-01T00:00:00Z") == []
    done = subprocess.run([FAASCI, "audit", "--since", "yesterday"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "since" in done.stderr


def test_audit_lists_pushes_schedules_and_rotations_with_their_actors(
    gateway, webhook, webhook_repo, scheduled_repo
):
    """A signed push is the git host's sender, a scheduled round run by an admin is that
    admin, a rotation is the person who asked for it."""
    me = f"user:{getpass.getuser()}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=webhook_repo, text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    pushed = webhook({"ref": "refs/heads/main", "after": head, "sender": {"login": "octocat"},
                      "repository": {"clone_url": str(webhook_repo)}})  # fmt: skip
    assert pushed.status_code == 202, pushed.text
    push_run = pushed.json()["run_id"]
    cron = gateway.call("webhook", b"", headers=CRON_HEADERS)
    assert cron.status_code == 200, cron.text
    (cron_run,) = cron.json()["started"]
    faasci("secrets", "rotate", "--force")

    (push,) = trail("--run", push_run)
    assert push["action"] == "run.start" and push["actor"] == "github:octocat"
    assert push["commit"] == head and push["detail"]["trigger"] == "push"
    (scheduled,) = trail("--run", cron_run)
    assert scheduled["actor"] == "user:test-admin" and scheduled["detail"]["trigger"] == "cron"
    assert scheduled["repo"] == str(scheduled_repo)
    rotation = [e for e in trail("--since", "10m") if e["action"] == "secrets.rotate"][-1]
    assert rotation["actor"] == me and rotation["detail"]["name"] == "internal-signing"
    for run_id in (push_run, cron_run):
        assert wait_for_run(gateway, run_id)["status"] == "passed"


def test_audit_needs_an_admin(gateway, token):
    for role, status in (("viewer", 403), ("runner", 403), ("admin", 200)):
        resp = gateway.session.get(f"{gateway.url}/function/runs/audit",
                                   headers={"Authorization": f"Bearer {token(role)}"})  # fmt: skip
        assert resp.status_code == status, resp.text
    assert requests.get(f"{gateway.url}/function/runs/audit", timeout=30).status_code == 401


def nats_delete(url: str, **credentials) -> str:
    """Try to delete the audit stream as a NATS client: what happened."""

    async def attempt():
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3,
                                    error_cb=_quiet, **credentials)  # fmt: skip
        except Exception as e:
            return f"refused: {e}"
        try:
            await nc.jetstream().delete_stream(audit.STREAM)
            return "deleted"
        except Exception as e:
            return f"denied: {type(e).__name__} {e}"
        finally:
            await nc.close()

    return asyncio.run(attempt())


async def _quiet(e):
    pass


def test_nats_refuses_clients_without_the_token(stack, client_settings):
    audit.record("test.mark", actor="test")  # the stream exists
    assert nats_delete(stack.nats_url).startswith("refused")
    assert nats_delete(stack.nats_url, user="faasci", password="wrong").startswith("refused")
    # the stack's own credentials connect, and still cannot remove the trail
    assert nats_delete(stack.nats_url, **client_settings.nats_credentials()).startswith("denied")
    assert any(e["action"] == "test.mark" for e in audit.entries(since="10m"))
    conf = stack.run / "nats.conf"
    assert conf.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("reads_token", [False, True])
def test_a_stage_cannot_delete_the_audit_stream(gateway, make_repo, outside, stack, reads_token):
    """A stage's commands speak NATS's protocol to the stack's server: without the token
    they are refused; with whatever they can find of it they still cannot delete."""
    port = stack.nats_port
    secret = stack.secrets_dir / "nats-token"
    script = f"""\
import json, pathlib, socket, time
s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
s.recv(4096)  # INFO
password = ""
if {reads_token}:
    try:
        password = pathlib.Path("{secret}").read_text().strip()
    except OSError as e:
        print("token unreadable:", type(e).__name__)
connect = {{"verbose": True, "pedantic": False}}
if password:
    connect.update({{"user": "faasci", "pass": password}})
s.sendall(("CONNECT " + json.dumps(connect) + "\\r\\n").encode()
          + b"PUB $JS.API.STREAM.DELETE.{audit.STREAM} _INBOX.x 0\\r\\n\\r\\nPING\\r\\n")
time.sleep(1)
print("NATS said:", s.recv(65536).decode(errors="replace"))
"""
    (outside / "probe.py").write_text(script)
    repo = pipeline(make_repo, f'  unit:\n    run: ["python3 {outside / "probe.py"}"]\n')
    before = len(audit_entries_any(gateway))
    run_id = gateway.call("runs", {"repo": str(repo)}).json()["id"]
    run = wait_for_run(gateway, run_id)
    log = gateway.call("pipeline-log", method="GET", path=f"{run_id}/unit/1").text
    assert "NATS said:" in log, log
    said = log.split("NATS said:", 1)[1]
    assert "Authorization Violation" in said or "Permissions Violation" in said, log
    assert run["status"] == "passed"
    time.sleep(0.5)
    assert len(audit_entries_any(gateway)) > before  # the stream is still there, and grew


def audit_entries_any(gateway) -> list[dict]:
    resp = gateway.call("runs", method="GET", path="audit", query={"since": "1h"})
    assert resp.status_code == 200, resp.text
    return resp.json()["entries"]
