"""Signed webhooks: each host's signature checked before anything else, only configured
repositories and refs start runs, a replayed delivery starts nothing (claims in a real
NATS key-value bucket); and the scheduled round's slot (faasci.schedule)."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from werkzeug.datastructures import Headers

from faasci import auth, schedule, services, webhooks
from faasci.errors import UserError

SECRET = "s3cr3t-webhook-value"
PREVIOUS = "the-previous-value"
SHA = "a" * 40
REPO = "https://github.com/acme/shop"


@dataclass
class Event:
    body: bytes
    headers: Headers
    method: str = "POST"
    path: str = "/"
    query: dict = field(default_factory=dict)


def github(body: dict | bytes, secret: str = SECRET, event: str = "push", **extra) -> Event:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sig = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()),
               "X-Hub-Signature-256": sig, "Content-Type": "application/json", **extra}  # fmt: skip
    return Event(raw, Headers({k: v for k, v in headers.items() if v is not None}))


def gitea(body: dict, secret: str = SECRET, event: str = "push", **extra) -> Event:
    raw = json.dumps(body).encode()
    headers = {"X-Gitea-Event": event, "X-Gitea-Delivery": str(uuid.uuid4()),
               "X-Gitea-Signature": hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest(),
               # Gitea sends GitHub's headers too (not signed with sha256= here)
               "X-GitHub-Event": event, "X-GitHub-Delivery": "x", **extra}  # fmt: skip
    return Event(raw, Headers({k: v for k, v in headers.items() if v is not None}))


def gitlab(body: dict, token: str = SECRET, event: str = "Push Hook", **extra) -> Event:
    raw = json.dumps(body).encode()
    headers = {"X-Gitlab-Event": event, "X-Gitlab-Token": token,
               "Idempotency-Key": str(uuid.uuid4()),
               "X-Gitlab-Event-UUID": str(uuid.uuid4()), **extra}  # fmt: skip
    return Event(raw, Headers({k: v for k, v in headers.items() if v is not None}))


def github_push(ref: str = "refs/heads/main", after: str = SHA, url: str = REPO) -> dict:
    return {"ref": ref, "before": "b" * 40, "after": after, "deleted": after == "0" * 40,
            "repository": {"clone_url": f"{url}.git", "html_url": url,
                           "ssh_url": "git@github.com:acme/shop.git"},
            "sender": {"login": "octocat"}, "pusher": {"name": "octocat"}}  # fmt: skip


def gitlab_push(ref: str = "refs/heads/main", sha: str = SHA) -> dict:
    return {"object_kind": "push", "ref": ref, "before": "b" * 40, "after": sha,
            "checkout_sha": sha if sha != "0" * 40 else None, "user_username": "jsmith",
            "project": {"git_http_url": "https://gitlab.example.com/acme/shop.git",
                        "git_ssh_url": "git@gitlab.example.com:acme/shop.git",
                        "web_url": "https://gitlab.example.com/acme/shop"}}  # fmt: skip


@pytest.fixture
def started(monkeypatch):
    """Runs started (recorded, not really started), with the actor they were started as."""
    calls = []

    def fake_start(repo, ref=None, *, trigger="manual", commit=None, **_):
        calls.append({"repo": repo, "ref": ref, "trigger": trigger, "commit": commit,
                      "actor": auth.actor()})  # fmt: skip
        return SimpleNamespace(id=f"run-{len(calls)}", commit=commit, ref=ref)

    monkeypatch.setattr(webhooks, "start_run", fake_start)
    return calls


@pytest.fixture
def secrets(monkeypatch):
    values = [SECRET, PREVIOUS]
    monkeypatch.setattr(webhooks, "webhook_secrets", lambda refresh=False: list(values))
    return values


@pytest.fixture
def claims(monkeypatch, nats_bus):
    """Delivery and slot claims in a real NATS of the test's own."""
    monkeypatch.setattr(services, "bus", lambda: nats_bus)
    return nats_bus


@pytest.fixture
def configured(monkeypatch):
    def configure(value: str) -> None:
        monkeypatch.setenv("WEBHOOK_REPOS", value)

    configure(f"{REPO}#main,release/*,refs/tags/v* https://gitlab.example.com/acme/shop "
              "https://gitea.example.com/acme/shop")  # fmt: skip
    return configure


def answer(event) -> tuple[int, dict]:
    from faasci.api import _answer

    result = _answer(lambda: webhooks.handle(event))
    return result["statusCode"], result["body"]


# The signature comes first.


@pytest.mark.parametrize(
    "make, header",
    [
        (lambda: github(github_push(), secret="wrong"), "X-Hub-Signature-256"),
        (lambda: github(github_push(), **{"X-Hub-Signature-256": None}), "X-Hub-Signature-256"),
        (
            lambda: github(github_push(), **{"X-Hub-Signature-256": "sha256=" + "0" * 64}),
            "X-Hub-Signature-256",
        ),
        (
            lambda: github(github_push(), **{"X-Hub-Signature-256": "sha1=" + "0" * 40}),
            "X-Hub-Signature-256",
        ),
        (lambda: gitea(github_push(), secret="wrong"), "X-Gitea-Signature"),
        (lambda: gitea(github_push(), **{"X-Gitea-Signature": None}), "X-Gitea-Signature"),
        (lambda: gitlab(gitlab_push(), token="wrong"), "X-Gitlab-Token"),
        (lambda: gitlab(gitlab_push(), token=SECRET[:-1]), "X-Gitlab-Token"),
        (lambda: gitlab(gitlab_push(), **{"X-Gitlab-Token": None}), "X-Gitlab-Token"),
    ],
)
def test_a_missing_or_bad_signature_is_401_and_starts_nothing(make, header, started, secrets,
                                                               configured):  # fmt: skip
    status, body = answer(make())
    assert status == 401, body
    assert body["field"] == header and header in body["error"]
    assert started == []


def test_a_request_of_no_known_host_is_401(started, secrets, configured):
    status, body = answer(Event(json.dumps(github_push()).encode(), Headers({})))
    assert status == 401 and "X-Hub-Signature-256" in body["error"]
    assert started == []


def test_nothing_is_parsed_before_the_signature_checks_out(
    started, secrets, configured, monkeypatch
):
    """An unsigned body nesting 100,000 arrays is refused for its signature (401), never
    read as JSON."""
    parsed = []
    monkeypatch.setattr(webhooks, "json_body", lambda event: parsed.append(event) or {})
    bomb = b"[" * 100_000
    status, _ = answer(github(bomb, secret="wrong"))
    assert status == 401 and parsed == []
    status, body = answer(github(bomb))  # signed: now it is read, and refused as a body
    assert parsed and status == 400


def test_the_previous_secret_still_verifies_during_the_overlap(started, secrets, configured,
                                                               claims):  # fmt: skip
    status, body = answer(github(github_push(), secret=PREVIOUS))
    assert status == 202, body


def test_a_secret_rotated_since_it_was_read_is_asked_for_again(started, configured, claims,
                                                              monkeypatch):  # fmt: skip
    asked = []

    def from_vault(refresh=False):
        asked.append(refresh)
        return ["new-value"] if refresh else [SECRET]

    monkeypatch.setattr(webhooks, "webhook_secrets", from_vault)
    status, _ = answer(github(github_push(), secret="new-value"))
    assert status == 202 and asked == [False, True]


def test_no_secret_to_check_with_is_503(started, configured, monkeypatch):
    def nothing(refresh=False):
        raise webhooks.Unavailable("no webhook-secret is configured", "webhook-secret")

    monkeypatch.setattr(webhooks, "webhook_secrets", nothing)
    status, body = answer(github(github_push()))
    assert status == 503 and started == []


def test_signature_comparison_is_constant_time(monkeypatch, secrets):
    """Every accepted value is compared with hmac.compare_digest (never ==)."""
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(webhooks.hmac, "compare_digest",
                        lambda a, b: compared.append((a, b)) or real(a, b))  # fmt: skip
    assert webhooks.signed("gitlab", Headers({"X-Gitlab-Token": SECRET}), b"", secrets)
    assert len(compared) == 2  # both values, although the first matched


# Each host's push.


def test_a_signed_github_push_starts_a_run_as_its_sender(started, secrets, configured, claims):
    status, body = answer(github(github_push()))
    assert status == 202, body
    assert body["run_id"] == "run-1" and body["commit"] == SHA and body["ref"] == "main"
    (call,) = started
    assert call == {"repo": REPO, "ref": "main", "trigger": "push", "commit": SHA,
                    "actor": "github:octocat"}  # fmt: skip


def test_a_signed_gitlab_push_starts_a_run(started, secrets, configured, claims):
    status, body = answer(gitlab(gitlab_push()))
    assert status == 202, body
    (call,) = started
    assert call["repo"] == "https://gitlab.example.com/acme/shop" and call["commit"] == SHA
    assert call["actor"] == "gitlab:jsmith" and call["ref"] == "main"


def test_a_signed_gitea_push_starts_a_run(started, secrets, configured, claims):
    push = github_push(url="https://gitea.example.com/acme/shop")
    push["sender"] = {"login": "gitea-user"}
    status, body = answer(gitea(push))
    assert status == 202, body
    (call,) = started
    assert call["repo"] == "https://gitea.example.com/acme/shop"
    assert call["actor"] == "gitea:gitea-user"


def test_a_forgejo_push_is_a_gitea_push(started, secrets, configured, claims):
    push = github_push(url="https://gitea.example.com/acme/shop")
    raw = json.dumps(push).encode()
    headers = Headers({"X-Forgejo-Event": "push", "X-Forgejo-Delivery": "f-1",
                       "X-Forgejo-Signature": hmac.new(SECRET.encode(), raw,
                                                       hashlib.sha256).hexdigest()})  # fmt: skip
    status, body = answer(Event(raw, headers))
    assert status == 202, body


def test_a_gitlab_tag_push_runs_the_tagged_commit(started, secrets, configured, claims):
    push = gitlab_push(ref="refs/tags/v1.0")
    push["after"] = "c" * 40  # the tag object; checkout_sha is the commit
    status, _ = answer(gitlab(push, event="Tag Push Hook"))
    assert status == 202
    assert started[0]["commit"] == SHA and started[0]["ref"] == "v1.0"


def test_ping_and_other_events_answer_200_and_start_nothing(started, secrets, configured):
    status, body = answer(github({"zen": "Keep it logically awesome.", "hook_id": 1},
                                 event="ping"))  # fmt: skip
    assert status == 200 and body["pong"] is True
    for event in (github({"action": "opened"}, event="issues"),
                  gitlab({"object_kind": "note"}, event="Note Hook"),
                  gitea({"action": "opened"}, event="issues")):  # fmt: skip
        status, body = answer(event)
        assert status == 200 and "starts nothing" in body["ignored"]
    assert started == []


def test_a_deleted_branch_starts_nothing(started, secrets, configured, claims):
    status, body = answer(github(github_push(after="0" * 40)))
    assert status == 200 and "deleted" in body["ignored"]
    status, body = answer(gitlab(gitlab_push(sha="0" * 40)))
    assert status == 200 and "deleted" in body["ignored"]
    assert started == []


@pytest.mark.parametrize("push, field", [
    ({"ref": "refs/heads/main", "after": SHA}, "repository"),
    ({**github_push(), "ref": "main"}, "ref"),
    ({**github_push(), "after": "not-a-sha"}, "after"),
    ({**github_push(), "repository": {"name": "no urls"}}, "repository"),
])  # fmt: skip
def test_a_malformed_signed_push_is_400(push, field, started, secrets, configured):
    status, body = answer(github(push))
    assert status == 400 and body["field"] == field
    assert started == []


# Only configured repositories and refs.


@pytest.mark.parametrize("ref, runs", [
    ("refs/heads/main", True),
    ("refs/heads/release/1.2", True),
    ("refs/tags/v1.0", True),
    ("refs/heads/feature/x", False),
    ("refs/heads/mainline", False),
    ("refs/tags/nightly", False),
])  # fmt: skip
def test_only_configured_branches_and_tags_start_runs(ref, runs, started, secrets, configured,
                                                      claims):  # fmt: skip
    status, body = answer(github(github_push(ref=ref)))
    assert (status == 202) is runs, body
    if not runs:
        assert status == 200 and "not configured" in body["ignored"] and started == []


def test_a_repository_without_globs_runs_every_branch_and_tag(started, secrets, configured,
                                                             claims):  # fmt: skip
    for ref in ("refs/heads/anything/at-all", "refs/tags/whatever"):
        status, _ = answer(gitlab(gitlab_push(ref=ref)))
        assert status == 202


def test_an_unconfigured_repository_is_ignored(started, secrets, configured):
    status, body = answer(github(github_push(url="https://github.com/acme/other")))
    assert status == 200 and "not configured" in body["ignored"] and started == []


def test_nothing_configured_ignores_every_push(started, secrets, configured):
    configured("")
    status, body = answer(github(github_push()))
    assert status == 200 and "WEBHOOK_REPOS" in body["ignored"] and started == []


def test_the_run_is_of_the_configured_url_not_the_payloads(started, secrets, configured, claims):
    """Spelt differently in the payload (`.git`, another case of host, the SSH URL), it is
    the configured repository that runs."""
    push = github_push()
    push["repository"] = {"clone_url": "https://GitHub.com/acme/shop.git/"}
    status, _ = answer(github(push))
    assert status == 202 and started[0]["repo"] == REPO
    push["repository"] = {"ssh_url": "git@github.com:acme/shop.git"}
    configured("git@github.com:acme/shop.git")
    status, _ = answer(github(push))
    assert status == 202 and started[1]["repo"] == "git@github.com:acme/shop.git"


def test_ref_globs():
    assert webhooks.ref_allowed("refs/heads/main", [])
    assert webhooks.ref_allowed("refs/tags/v1", [])
    assert not webhooks.ref_allowed("refs/pull/1/head", [])
    assert webhooks.ref_allowed("refs/heads/release/1/2", ["release/*"])
    assert not webhooks.ref_allowed("refs/tags/main", ["main"])  # a branch glob: branches only
    assert webhooks.ref_allowed("refs/tags/v2", ["refs/tags/v*"])


# Replays.


def test_a_replayed_delivery_starts_nothing_new(started, secrets, configured, claims):
    event = github(github_push())
    assert answer(event)[0] == 202
    status, body = answer(event)
    assert status == 200 and body["duplicate"] == event.headers["X-GitHub-Delivery"]
    assert len(started) == 1


def test_a_replayed_body_under_a_new_delivery_id_starts_nothing_new(
    started, secrets, configured, claims
):
    """The delivery id is not signed: a captured body sent again with a fresh id is a
    replay too."""
    first = github(github_push())
    assert answer(first)[0] == 202
    again = Event(first.body, Headers(first.headers))
    again.headers["X-GitHub-Delivery"] = str(uuid.uuid4())
    status, body = answer(again)
    assert status == 200 and "duplicate" in body
    assert len(started) == 1


def test_a_gitlab_retry_has_the_same_idempotency_key(started, secrets, configured, claims):
    event = gitlab(gitlab_push())
    assert answer(event)[0] == 202
    event.headers["X-Gitlab-Event-UUID"] = str(uuid.uuid4())  # a retry: same Idempotency-Key
    assert answer(event)[1].get("duplicate") == event.headers["Idempotency-Key"]
    assert len(started) == 1


def test_a_push_whose_run_failed_to_start_may_be_delivered_again(started, secrets, configured,
                                                                claims, monkeypatch):  # fmt: skip
    event = github(github_push())

    def unreachable(*args, **kwargs):
        raise UserError("cannot read repository", field="repo")

    real = webhooks.start_run
    monkeypatch.setattr(webhooks, "start_run", unreachable)
    assert answer(event)[0] == 400
    monkeypatch.setattr(webhooks, "start_run", real)
    assert answer(event)[0] == 202  # the host's redelivery
    assert len(started) == 1


def test_a_delivery_without_an_id_is_400(started, secrets, configured, claims):
    event = github(github_push(), **{"X-GitHub-Delivery": None})
    status, body = answer(event)
    assert status == 400 and started == []


# The scheduled round's slot.

NIGHTLY = "0 2 * * *"
SLOT = datetime(2026, 3, 4, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize("now, expected", [
    (SLOT, SLOT),
    (SLOT + timedelta(milliseconds=300), SLOT),
    (SLOT + timedelta(minutes=9, seconds=59), SLOT),
    (SLOT + timedelta(minutes=10), SLOT),
    (SLOT - timedelta(seconds=20), SLOT),  # a connector whose clock runs a little ahead
    (SLOT + timedelta(minutes=10, seconds=1), None),
    (SLOT - timedelta(minutes=1), None),
    (SLOT + timedelta(hours=12), None),
])  # fmt: skip
def test_the_slot_a_request_belongs_to(now, expected):
    assert schedule.slot(NIGHTLY, now) == expected


def test_every_minute_schedules_have_a_slot_every_minute():
    now = datetime(2026, 3, 4, 2, 7, 59, tzinfo=UTC)
    assert schedule.slot("* * * * *", now) == datetime(2026, 3, 4, 2, 7, tzinfo=UTC)


def test_a_due_slot_runs_once(claims):
    """The first request within the window claims the slot; every other is skipped, the
    next day's slot is due again, and another function's slot is its own."""
    assert schedule.due("webhook", NIGHTLY, SLOT + timedelta(seconds=1)) is True
    assert schedule.due("webhook", NIGHTLY, SLOT + timedelta(minutes=3)) is False
    assert schedule.due("cache-invalidator", NIGHTLY, SLOT + timedelta(seconds=2)) is True
    assert schedule.due("webhook", NIGHTLY, SLOT + timedelta(days=1, seconds=1)) is True


def test_a_cron_request_outside_its_slot_is_403(claims):
    with pytest.raises(schedule.NotDue) as caught:
        schedule.due("webhook", NIGHTLY, SLOT + timedelta(hours=3))
    assert caught.value.status == 403
    assert caught.value.body()["error"].startswith("no scheduled round is due")


def test_a_function_without_a_schedule_never_has_a_due_round(claims, monkeypatch):
    monkeypatch.delenv("FAASCI_SCHEDULE", raising=False)
    with pytest.raises(schedule.NotDue) as caught:
        schedule.due("unit", now=SLOT)
    assert "FAASCI_SCHEDULE" in caught.value.message
    monkeypatch.setenv("FAASCI_SCHEDULE", NIGHTLY)
    assert schedule.due("unit", now=SLOT) is True


def test_the_router_runs_an_uncredentialed_cron_request_only_in_its_slot(claims, monkeypatch):
    """faasci.api.Router asks schedule.due for cron-connector's request: inside the slot it
    runs the round once (then skips), outside it answers 403 and runs nothing."""
    from faasci.api import Router

    ran = []
    router = Router("webhook", [], on_schedule=lambda: ran.append(1) or {"trigger": "cron"})
    cron = Event(b"", Headers({"X-Connector": "cron-connector", "X-Topic": "cron-function"}))
    monkeypatch.setenv("FAASCI_SCHEDULE", NIGHTLY)
    real_due = schedule.due
    at = [SLOT + timedelta(hours=3)]
    monkeypatch.setattr(schedule, "due", lambda name: real_due(name, now=at[0]))
    outside = router(cron)
    assert outside["statusCode"] == 403, outside
    assert outside["body"]["error"].startswith("no scheduled round is due") and ran == []
    at[0] = SLOT + timedelta(seconds=5)
    assert router(cron)["statusCode"] == 200 and ran == [1]
    skipped = router(cron)
    assert skipped["statusCode"] == 200 and "skipped" in skipped["body"] and ran == [1]


def test_a_repository_pattern_runs_the_payloads_url(started, secrets, configured, claims):
    """`https://github.com/acme/*` (an organisation's webhook) takes every repository of
    acme, and runs the URL the payload names; other owners stay out."""
    configured("https://github.com/acme/*#main")
    status, _ = answer(github(github_push(url="https://github.com/acme/billing")))
    assert status == 202 and started[0]["repo"] == "https://github.com/acme/billing.git"
    status, body = answer(github(github_push(url="https://github.com/evil/billing")))
    assert status == 200 and "not configured" in body["ignored"]
    status, body = answer(github(github_push(ref="refs/heads/dev")))
    assert status == 200 and "not configured" in body["ignored"]
