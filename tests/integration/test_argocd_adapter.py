"""The deploy stage's Argo CD adapter (faasci.rollout) against tests/argocd_fake.py, a local
server speaking Argo CD's documented REST forms and states (Argo CD itself needs
Kubernetes, which cannot run here): sync at the promoted revision, wait until Synced and
Healthy there, fail with Argo CD's own message otherwise."""

import io
import threading
from types import SimpleNamespace

import pytest
from argocd_fake import DEGRADED, SYNC_FAILED, ArgoCDFake, Step

from faasci import pipeline, rollout

REVISION = "3f2c" * 10  # the environment repository's commit the promote stage made


@pytest.fixture
def argo(monkeypatch):
    monkeypatch.setattr(rollout, "POLL_S", 0.05)  # the fake moves one step per read
    with ArgoCDFake() as fake:
        yield fake


def target(argo, token_file, **extra) -> rollout.ArgoCDTarget:
    return rollout.ArgoCDTarget(server=argo.url, application="inventory",
                                token_file=str(token_file), **extra)  # fmt: skip


@pytest.fixture
def token_file(argo, tmp_path):
    path = tmp_path / "argocd-token"
    path.write_text(argo.token + "\n")
    return path


def roll(target, revision=REVISION, secrets=None):
    out = io.BytesIO()
    result = rollout.rollout_argocd(target, revision, "reg/inv@sha256:" + "a" * 64,
                                    secrets or {}, out, threading.Event())  # fmt: skip
    return result, out.getvalue().decode()


def test_a_sync_that_progresses_ends_synced_and_healthy_at_the_revision(argo, token_file):
    """Sync is asked for at the promoted revision with the bearer token; the adapter waits
    through OutOfSync and Progressing until Synced and Healthy there, and records it."""
    app = argo.add("inventory", revision="1" * 40)
    result, log = roll(target(argo, token_file, prune=True))
    assert result.healthy, result.error
    assert app.syncs == [{"name": "inventory", "revision": REVISION, "prune": True}]
    assert {auth for _, _, auth in argo.requests} == {f"Bearer {argo.token}"}
    gets = [path for method, path, _ in argo.requests if method == "GET"]
    assert len(gets) >= 4  # before, then through every step of the plan
    record = result.deployment
    assert (record.target, record.application, record.revision) == (
        "argocd", "inventory", REVISION)  # fmt: skip
    assert record.previous == "1" * 40 and record.healthy_after_s is not None
    assert f"Synced and Healthy at {REVISION}" in log


def test_syncing_head_records_the_commit_argo_cd_resolved(argo, token_file):
    """Without a promoted commit the sync asks for HEAD; done once the operation resolved
    it and the application is Synced there: that commit is recorded."""
    app = argo.add("inventory")
    result, _ = roll(target(argo, token_file), revision="HEAD")
    assert result.healthy, result.error
    assert app.syncs[0]["revision"] == "HEAD"
    assert result.deployment.revision == argo.head


def test_a_degraded_application_fails_with_argo_cds_message(argo, token_file):
    """Degraded after the sync: the stage fails (rollout, not retried) with its message."""
    argo.add("inventory", plan=DEGRADED)
    result, log = roll(target(argo, token_file))
    assert result.reason == "rollout"
    assert result.error == ('application inventory is Degraded: Deployment "inventory" '
                            "exceeded its progress deadline")  # fmt: skip
    assert result.error in log


def test_a_failed_sync_operation_fails_with_argo_cds_message(argo, token_file):
    """The operation's phase Failed: its message is the error."""
    argo.add("inventory", plan=SYNC_FAILED)
    result, _ = roll(target(argo, token_file))
    assert result.reason == "rollout"
    assert result.error.startswith("Argo CD's sync of inventory failed: one or more objects")
    assert "spec.template.spec.containers[0].image: Required value" in result.error


def test_an_application_still_progressing_at_the_timeout_fails_saying_its_state(argo, token_file):
    """Never healthy within the timeout: the error says the last state Argo CD reported."""
    argo.add("inventory", plan=[Step("Synced", "Progressing", "Running", "rolling")])
    result, _ = roll(target(argo, token_file, timeout=1))
    assert result.reason == "rollout"
    assert result.error == (f"application inventory was not Synced and Healthy at {REVISION} "
                            f"within 1s: sync Synced at {REVISION}, health Progressing, "
                            "operation Running")  # fmt: skip


def test_a_missing_token_is_a_clear_error_and_nothing_is_sent(argo, tmp_path):
    """A token file that is not there fails as `secrets`, naming it, before any request."""
    argo.add("inventory")
    result, _ = roll(target(argo, tmp_path / "no-such-token"))
    assert result.reason == "secrets"
    assert result.error == f"argocd.token_file {tmp_path / 'no-such-token'}: No such file or " \
                           "directory"  # fmt: skip
    assert argo.requests == []


def test_a_token_argo_cd_refuses_fails_with_its_answer(argo, tmp_path):
    """A wrong token: Argo CD's 401 and its message, never the token, in the error."""
    argo.add("inventory")
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    result, log = roll(target(argo, wrong))
    assert result.reason == "secrets"
    assert result.error == "Argo CD refused the token (HTTP 401): no session information"
    assert "not-the-token" not in log


def test_an_unknown_application_fails_with_argo_cds_message(argo, token_file):
    """404 for an application Argo CD does not have: its message, not retried."""
    result, _ = roll(target(argo, token_file))
    assert result.reason == "rollout"
    assert result.error == ('Argo CD answered HTTP 404: applications.argoproj.io "inventory" '
                            "not found")  # fmt: skip


def test_the_deploy_stage_uses_its_stage_secret_and_the_promoted_commit(argo):
    """Through rollout.deploy as the stage calls it: the token is the stage secret the
    target names, the revision the promote stage's recorded commit."""
    app = argo.add("inventory")
    spec = pipeline.parse(f"""\
service: inventory
stages:
  deploy:
    secrets: {{ARGO_TOKEN: argocd#token}}
    argocd: {{server: "{argo.url}", application: inventory, token_secret: ARGO_TOKEN}}
""", "inventory").stages["deploy"]  # fmt: skip
    promoted = SimpleNamespace(status="passed", promotion={"commit": REVISION})
    promote = SimpleNamespace(attempts=[promoted])
    run = SimpleNamespace(image="reg/inv@sha256:" + "b" * 64, stage=lambda name: promote)
    out = io.BytesIO()
    result = rollout.deploy(run, spec, out, threading.Event(),
                            lambda: {"ARGO_TOKEN": argo.token})  # fmt: skip
    assert result.healthy, result.error
    assert app.syncs[0]["revision"] == REVISION
    assert result.deployment.image == run.image
