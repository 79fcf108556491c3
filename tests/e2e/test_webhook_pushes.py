"""Signed webhooks, the scheduled round's gate, local repositories that run their own git
configuration, and cache poisoning, on the real local stack."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime

import git_traps
import pytest
import requests
from conftest import commit_all, git, wait_for_run

from faasci import cache, schedule, services
from faasci.local.cron import CRON_HEADERS


@pytest.fixture(scope="module")
def webhook_secret(webhook) -> str:
    """The stack's current webhook secret (conftest's `webhook` read it from OpenBao)."""
    return webhook.secret


def post(stack, body: bytes, headers: dict) -> requests.Response:
    """A request as a git host sends it: no token of ours, only its own headers."""
    return requests.post(f"{stack.gateway_url}/function/webhook", data=body,
                         headers={"Content-Type": "application/json", **headers},
                         timeout=120)  # fmt: skip


def github_push(repo, head: str, ref: str = "refs/heads/main") -> bytes:
    return json.dumps({
        "ref": ref, "before": "0" * 39 + "1", "after": head, "deleted": False,
        "repository": {"clone_url": f"file://{repo}", "full_name": "acme/sample"},
        "sender": {"login": "octocat"}, "pusher": {"name": "octocat"},
    }).encode()  # fmt: skip


def github_headers(secret: str, body: bytes, event: str = "push") -> dict:
    return {"X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": "sha256=" + hmac.new(secret.encode(), body,
                                                        hashlib.sha256).hexdigest()}  # fmt: skip


def new_commit(repo) -> str:
    (repo / "CHANGES.md").write_text(f"{uuid.uuid4()}\n")
    return commit_all(repo, "a change to push")


def runs_of(gateway, commit: str) -> list[dict]:
    listed = gateway.call("runs", method="GET", query={"limit": "500"}).json()["runs"]
    return [r for r in listed if r["commit"] == commit]


def entries_of(repo, timeout: float = 60) -> list[dict]:
    """The repository's cache entries in S3, once there are some (uploads finish after
    their stage)."""
    deadline = time.monotonic() + timeout
    while not (found := services.dependency_cache().entries(cache.namespace_of(str(repo)))):
        assert time.monotonic() < deadline, f"no cache entry of {repo}"
        time.sleep(0.5)
    return found


def test_a_signed_github_push_starts_a_run_recorded_as_its_sender(stack, gateway, webhook_repo,
                                                                  webhook_secret,
                                                                  client_settings):  # fmt: skip
    head = new_commit(webhook_repo)
    body = github_push(webhook_repo, head)
    resp = post(stack, body, github_headers(webhook_secret, body))
    assert resp.status_code == 202, resp.text
    run = wait_for_run(gateway, resp.json()["run_id"])
    assert run["status"] == "passed" and run["trigger"] == "push"
    assert run["commit"] == head and run["ref"] == "main"
    assert run["repo"] == str(webhook_repo)  # the configured repository, not the payload's URL
    trail = gateway.call("runs", method="GET", path="audit", query={"run": run["id"]}).json()
    (started,) = [e for e in trail["entries"] if e["action"] == "run.start"]
    assert started["actor"] == "github:octocat" and started["commit"] == head


def test_a_missing_or_bad_signature_is_401_and_starts_nothing(stack, gateway, webhook_repo,
                                                              webhook_secret):  # fmt: skip
    head = new_commit(webhook_repo)
    body = github_push(webhook_repo, head)
    good = github_headers(webhook_secret, body)
    for headers in (
        {**good, "X-Hub-Signature-256": "sha256=" + "0" * 64},
        {k: v for k, v in good.items() if k != "X-Hub-Signature-256"},
        github_headers("not-the-secret", body),
        {"X-GitHub-Delivery": str(uuid.uuid4())},  # no event header at all
        {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "guess"},
        {"X-Gitea-Event": "push", "X-Gitea-Signature": "0" * 64},
    ):
        resp = post(stack, body, headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert "error" in resp.json()
    assert runs_of(gateway, head) == []


def test_a_replayed_delivery_starts_nothing_new(stack, gateway, webhook_repo, webhook_secret):
    head = new_commit(webhook_repo)
    body = github_push(webhook_repo, head)
    headers = github_headers(webhook_secret, body)
    first = post(stack, body, headers)
    assert first.status_code == 202, first.text
    again = post(stack, body, headers)
    assert again.status_code == 200 and again.json()["duplicate"] == headers["X-GitHub-Delivery"]
    renamed = post(stack, body, {**headers, "X-GitHub-Delivery": str(uuid.uuid4())})
    assert renamed.status_code == 200 and "duplicate" in renamed.json()
    wait_for_run(gateway, first.json()["run_id"])
    assert [r["id"] for r in runs_of(gateway, head)] == [first.json()["run_id"]]


def test_ping_unconfigured_refs_and_deleted_branches_start_nothing(stack, gateway, webhook_repo,
                                                                   webhook_secret):  # fmt: skip
    ping = json.dumps({"zen": "Design for failure.", "hook_id": 7}).encode()
    resp = post(stack, ping, github_headers(webhook_secret, ping, event="ping"))
    assert resp.status_code == 200 and resp.json()["pong"] is True
    head = new_commit(webhook_repo)
    for ref in ("refs/heads/feature/x", "refs/tags/nightly"):
        body = github_push(webhook_repo, head, ref=ref)
        resp = post(stack, body, github_headers(webhook_secret, body))
        assert resp.status_code == 200 and "not configured" in resp.json()["ignored"], resp.text
    other = github_push("/srv/not/configured", head)
    resp = post(stack, other, github_headers(webhook_secret, other))
    assert resp.status_code == 200 and "not configured" in resp.json()["ignored"]
    deleted = json.loads(github_push(webhook_repo, "0" * 40))
    deleted["deleted"] = True
    raw = json.dumps(deleted).encode()
    resp = post(stack, raw, github_headers(webhook_secret, raw))
    assert resp.status_code == 200 and "deleted" in resp.json()["ignored"]
    assert runs_of(gateway, head) == []


def test_a_signed_gitlab_tag_push_starts_a_run(stack, gateway, token, webhook_repo,
                                                webhook_secret):  # fmt: skip
    head = new_commit(webhook_repo)
    git(webhook_repo, "tag", "-a", f"v{head[:7]}", "-m", "release")
    body = json.dumps({
        "object_kind": "tag_push", "ref": f"refs/tags/v{head[:7]}", "before": "0" * 40,
        "after": git(webhook_repo, "rev-parse", f"v{head[:7]}"), "checkout_sha": head,
        "user_username": "jsmith", "project": {"git_http_url": f"file://{webhook_repo}"},
    }).encode()  # fmt: skip
    resp = post(stack, body, {"X-Gitlab-Event": "Tag Push Hook",
                              "X-Gitlab-Token": webhook_secret,
                              "Idempotency-Key": str(uuid.uuid4())})  # fmt: skip
    assert resp.status_code == 202, resp.text
    run_id = resp.json()["run_id"]
    # A v* tag of the example promotes to production, which waits for an admin.
    deadline = time.monotonic() + 300
    while not (gateway.call("runs", method="GET", path=run_id).json().get("approval")):
        assert time.monotonic() < deadline, "the tag's run never asked for an approval"
        time.sleep(0.5)
    approved = requests.post(f"{stack.gateway_url}/function/runs/{run_id}/approve", timeout=60,
                             headers={"Authorization": f"Bearer {token('admin')}"})  # fmt: skip
    assert approved.status_code == 200, approved.text
    run = wait_for_run(gateway, run_id)
    assert run["commit"] == head and run["ref"] == f"v{head[:7]}" and run["status"] == "passed"
    promotion = next(s for s in run["stages"] if s["name"] == "promote")["attempts"][-1]
    assert promotion["promotion"]["environment"] == "production"


def test_a_forged_cron_request_runs_only_a_due_round(stack, gateway):
    """Without credentials, cron-connector's request runs the round only within its slot
    (once); at any other time it is 403 and starts nothing."""
    before = {r["id"] for r in gateway.call("runs", method="GET").json()["runs"]}  # newest 50
    resp = requests.post(f"{stack.gateway_url}/function/webhook", data=b"",
                         headers=CRON_HEADERS, timeout=300)  # fmt: skip
    nightly = stack_schedule("webhook")
    if schedule.slot(nightly, datetime.now(UTC)) is None:
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"].startswith("no scheduled round is due")
        after = {r["id"] for r in gateway.call("runs", method="GET").json()["runs"]}
        assert after == before
    else:  # by chance inside the nightly slot's window: it is the round that is due anyway
        assert resp.status_code == 200, resp.text


def stack_schedule(name: str) -> str:
    from conftest import ROOT

    from faasci import stack as stack_file

    spec = stack_file.load(ROOT / "stack.yml").functions[name]
    assert spec.environment["FAASCI_SCHEDULE"] == spec.schedule  # one anchor in stack.yml
    return spec.schedule


# A local repository that runs its own git configuration.


def test_a_run_of_an_armed_local_repository_runs_none_of_its_commands(gateway, make_repo, outside):
    """`faasci run <path>` of a repository whose .git/config names an fsmonitor, hooks and
    filter drivers (clean and dirty): the runs function and the stages run none of them
    (markers where stages could write too), and its .git stays byte for byte."""
    files = {**git_traps.TRAP_FILES,
             ".faasci.yml": "service: armed\nstages:\n  lint:\n    run: [cat a.txt data.dat]\n"
                            "  unit:\n    run: [cat a.txt]\n"}  # fmt: skip
    repo = make_repo(files, "armed")
    markers = git_traps.arm(repo, outside)
    before = {str(p): p.read_bytes() for p in sorted((repo / ".git").rglob("*")) if p.is_file()}
    clean = gateway.call("runs", {"repo": str(repo)})
    assert clean.status_code == 201, clean.text
    (repo / "a.txt").write_text("uncommitted\n")
    (repo / "data.dat").write_text("d = 2\n")
    (repo / "new.txt").write_text("untracked\n")
    dirty = gateway.call("runs", {"repo": str(repo)})
    assert dirty.status_code == 201, dirty.text
    for resp, text in ((clean, "committed text"), (dirty, "uncommitted")):
        run = wait_for_run(gateway, resp.json()["id"])
        assert run["status"] == "passed", run
        log = gateway.call("pipeline-log", method="GET", path=f"{run['id']}/lint/1").text
        assert text in log
    assert sorted(p.name for p in markers.iterdir()) == []
    after = {str(p): p.read_bytes() for p in sorted((repo / ".git").rglob("*")) if p.is_file()}
    assert after == before


# Cache poisoning: a repository declaring another's `service:` name.

# The same pipeline file (so the same cache key: manifests, set-up and paths alike); the
# set-up runs the repository's own install.sh, which the key does not cover.
POISON_PIPELINE = """\
service: victim-svc
cache:
  manifests: [deps.lock]
  paths: [deps]
  setup: ["sh install.sh"]
stages:
  lint:
    run: ["sh deps/tool.sh lint"]
  unit:
    run: ["sh deps/tool.sh unit"]
"""
GENUINE = "mkdir -p deps && printf 'echo genuine $1' > deps/tool.sh\n"
PLANTED = "mkdir -p deps && printf 'echo PLANTED $1; touch {marker}-$1' > deps/tool.sh\n"


def test_a_repository_declaring_anothers_service_cannot_plant_code_in_its_cache(
    gateway, make_repo, outside, client_settings
):
    """An attacker's repository names the victim's service and has the same manifests (so
    the same key), and its set-up plants a tool that leaves a marker. Its cache lands in
    its own namespace: the victim's lint and unit miss, build their own, and run the
    genuine tool; no marker appears; the S3 entries are one per repository."""
    marker = outside / "planted"
    common = {"deps.lock": "lib==1\n", ".faasci.yml": POISON_PIPELINE}
    attacker = make_repo({**common, "install.sh": PLANTED.format(marker=marker)}, "attacker")
    victim = make_repo({**common, "install.sh": GENUINE}, "victim")
    planted = wait_for_run(gateway, gateway.call("runs", {"repo": str(attacker)}).json()["id"])
    assert planted["status"] == "passed"
    assert {"lint", "unit"} == {
        p.name.rsplit("-", 1)[-1] for p in outside.iterdir() if p.name.startswith("planted")
    }  # the attacker's own ran
    for p in outside.iterdir():
        p.unlink()

    run = wait_for_run(gateway, gateway.call("runs", {"repo": str(victim)}).json()["id"])
    assert run["status"] == "passed"
    by_stage = {s["name"]: s for s in run["stages"]}
    attacker_key = planted["stages"][0]["attempts"][-1]["cache"]["key"]
    first = by_stage["lint"]["attempts"][-1]["cache"]
    assert first["key"] == attacker_key  # the same key ...
    assert first["hit"] is False and first["reason"] == "absent"  # ... in another namespace
    for stage in ("lint", "unit"):
        log = gateway.call("pipeline-log", method="GET", path=f"{run['id']}/{stage}/1").text
        assert f"genuine {stage}" in log and "PLANTED" not in log
    assert list(outside.iterdir()) == []
    for repo in (attacker, victim):
        (entry,) = entries_of(repo)
        assert entry["repo"] == str(repo) and entry["key"] == attacker_key
