"""faasci.vault, faasci.secrets_api and faasci.stage_secrets against a real OpenBao server
(the `openbao` fixture: prepared as `faasci up` prepares the stack's)."""

import base64
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import commit_all

from faasci import cache, pipeline, runs, secrets_api, stage, stage_secrets, vault
from faasci.errors import Conflict, Unprocessable

REPO = "https://git.example.com/team/app.git"


@pytest.fixture
def audited(monkeypatch):
    """audit.record's calls, kept here instead of NATS."""
    calls = []
    monkeypatch.setattr(secrets_api.audit, "record",
                        lambda action, **kw: calls.append((action, kw)))  # fmt: skip
    return calls


@pytest.fixture
def admin(vault_settings):
    """This process as the secrets function: logged in with its own AppRole (it may write)."""
    from faasci import settings

    settings.configure(replace(vault_settings, vault_approle="vault-admin"))
    vault.reset()
    return vault.vault()


def put(openbao, repo: str, path: str, **values) -> None:
    openbao.root.secrets.kv.v2.create_or_update_secret(
        path=vault.repo_path(cache.namespace_of(repo), path), secret=values, mount_point="secret"
    )


def test_faasci_up_seeded_the_platform_secrets_and_the_functions_can_only_read(
    openbao, vault_settings
):
    for name in vault.PLATFORM_SECRETS:
        (value,) = vault.platform_secret(name)
        assert len(value) >= 32
    assert {"vault-role-id", "vault-secret-id", "vault-admin-role-id"} <= {
        p.name for p in openbao.secrets_dir.iterdir()
    }
    for p in openbao.secrets_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    client = vault.vault()
    with pytest.raises(vault.VaultError):
        client.write(f"{vault.PLATFORM}/internal-signing", {"current": "mine-now"})
    with pytest.raises(vault.VaultError):
        client.read("elsewhere/secret")


def test_platform_secret_is_cached_and_a_forced_refresh_is_rate_limited(openbao, vault_settings):
    (old,) = vault.platform_secret("webhook-secret")
    path = f"{vault.PLATFORM}/webhook-secret"
    data = openbao.root.secrets.kv.v2.read_secret_version(
        path=path, mount_point="secret", raise_on_deleted_version=True
    )
    changed = {**data["data"]["data"], "current": "changed-behind-its-back-0123"}
    openbao.root.secrets.kv.v2.create_or_update_secret(path=path, secret=changed,
                                                       mount_point="secret")  # fmt: skip
    try:
        assert vault.platform_secret("webhook-secret") == [old]  # cached: Vault not asked
        time.sleep(vault.REFRESH_MIN_S)
        assert vault.platform_secret("webhook-secret", refresh=True) == [
            "changed-behind-its-back-0123"
        ]
    finally:
        openbao.root.secrets.kv.v2.create_or_update_secret(path=path, secret=data["data"]["data"],
                                                           mount_point="secret")  # fmt: skip


def test_a_rotation_keeps_the_previous_value_for_its_overlap(vault_settings, admin, audited):
    (old,) = vault.platform_secret("internal-signing")
    rotated = secrets_api.rotate("internal-signing", force=True)
    new, previous = vault.platform_secret("internal-signing")
    assert previous == old and new != old
    assert rotated["name"] == "internal-signing" and rotated["overlap_s"] == 25 * 3600
    # Another rotation inside the overlap would drop `old`, which signed calls may carry.
    with pytest.raises(Conflict, match="previous value is accepted until"):
        secrets_api.rotate("internal-signing")
    # Past its window the previous value is no longer accepted.
    data = admin.read(f"{vault.PLATFORM}/internal-signing")
    admin.write(f"{vault.PLATFORM}/internal-signing", {**data, "previous_until": "1"})
    vault.reset_cache()
    assert vault.platform_secret("internal-signing") == [new]
    assert [a for a, _ in audited] == ["secrets.rotate"]
    assert old not in repr(audited) and new not in repr(audited)


def test_the_webhook_secret_overlap_is_days_and_the_schedule_leaves_it_until_it_is_old(
    vault_settings, admin, audited, monkeypatch
):
    (before,) = vault.platform_secret("webhook-secret")
    data = admin.read(f"{vault.PLATFORM}/internal-signing")
    admin.write(f"{vault.PLATFORM}/internal-signing", {**data, "previous_until": "1"})
    done = secrets_api.scheduled()
    assert [r["name"] for r in done["rotated"]] == ["internal-signing"]
    assert done["skipped"] == [{"name": "webhook-secret", "reason": "not due"}]
    rotated = secrets_api.rotate("webhook-secret")
    assert rotated["overlap_s"] == 7 * 24 * 3600
    vault.reset_cache()
    assert vault.platform_secret("webhook-secret")[1] == before


def test_repository_secrets_are_written_listed_by_name_and_confined_to_the_repository(
    vault_settings, admin, audited, monkeypatch
):
    ns = cache.namespace_of(REPO)
    secrets_api.write_repo_secret(ns, "db", {"password": "pw-0123456789"})
    secrets_api.write_repo_secret(ns, "db", {"user": "app-user"})  # merged, not replaced
    secrets_api.write_repo_secret(ns, "team/tls", {"key": "tls-key-material"})
    listed = secrets_api.list_repo_secrets(ns)
    assert listed["secrets"] == {"db": ["password", "user"], "team/tls": ["key"]}
    assert "pw-0123456789" not in repr(listed) and "pw-0123456789" not in repr(audited)
    assert [a for a, _ in audited] == ["secrets.write"] * 3
    for bad in ("../other", "/abs", "a/../../platform", "", "a//b", "."):
        with pytest.raises(Unprocessable):
            secrets_api.write_repo_secret(ns, bad, {"k": "value-long"})
    with pytest.raises(Unprocessable):
        secrets_api.write_repo_secret("..", "db", {"k": "value-long"})
    with pytest.raises(Unprocessable, match="shorter than"):
        secrets_api.write_repo_secret(ns, "db", {"pin": "123"})


ESCAPES = ["../x#k", "/faasci/platform/webhook-secret#current",
           "a/../../../platform/internal-signing#current", "db#"]  # fmt: skip


@pytest.mark.parametrize("ref", ESCAPES)
def test_a_pipeline_naming_a_path_outside_its_repository_is_refused(ref):
    with pytest.raises(Unprocessable) as e:
        pipeline.parse(f"stages:\n  unit:\n    run: x\n    secrets: {{X: '{ref}'}}\n", "s")
    assert e.value.field == "stages.unit.secrets.X.from"


# Stage secrets reaching their stage's commands, and only them.


def make_run(make_repo, text: str) -> runs.Run:
    repo = make_repo({".faasci.yml": text, "README": "x\n"})
    commit = commit_all(repo, "x")
    spec = pipeline.parse(text, "app")
    return runs.new_run(spec, repo=REPO, ref="main", commit=commit, source=str(repo))


PIPELINE = """
stages:
  lint:
    run: ['env | sort; ls -la ~; test -z "$DB_PASSWORD"']
  unit:
    run:
      - 'echo "plain=$DB_PASSWORD"'
      - 'printf %s "$DB_PASSWORD" | base64'
      - 'python3 -c "import os,urllib.parse as u; print(u.quote(os.environ[\\"DB_PASSWORD\\"]))"'
      - 'stat -c %a "$TLS_KEY_FILE"; cat "$TLS_KEY_FILE"'
      - 'echo "file=$TLS_KEY_FILE"'
    secrets:
      DB_PASSWORD: db#password
      TLS_KEY: {from: "tls#key", file: true}
"""
PASSWORD = "pa55/w0rd+with&odd=chars"
TLS = "-----BEGIN KEY-----\nMIItls-key-body-0123\n-----END KEY-----\n"


def run_stage(run: runs.Run, name: str, workdir: Path):
    """(outcome tuple, raw log, masked log, held secrets) of one stage's commands, as
    execute runs them."""
    workdir.mkdir(parents=True)
    held = stage_secrets.load(run, name)
    log = workdir / "stage.log"
    with log.open("wb") as out, stage_secrets.in_use(held):
        result = stage._run_commands(run, name, 1, workdir, out, stage.Watcher(run.id, name, 1),
                                     held)  # fmt: skip
    raw = log.read_text()
    held.masker.file(log)
    return result, raw, log.read_text(), held


def test_a_stage_gets_its_own_secrets_as_env_and_file_and_its_log_masks_every_form(
    openbao, vault_settings, make_repo, tmp_path, monkeypatch
):
    put(openbao, REPO, "db", password=PASSWORD)
    put(openbao, REPO, "tls", key=TLS)
    run = make_run(make_repo, PIPELINE)

    result, raw, masked, held = run_stage(run, "unit", tmp_path / "unit")
    assert result[1] is None, raw  # passed
    assert f"plain={PASSWORD}" in raw and "600\n" in raw  # the commands had them, the file 0600
    assert "MIItls-key-body-0123" in raw
    assert f"file={tmp_path / 'ws'}/home/.faasci-secrets/TLS_KEY" in raw
    for form in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(), quote(PASSWORD),
                 "MIItls-key-body-0123"):  # fmt: skip
        assert form in raw
        assert form not in masked
    assert "plain=***" in masked

    lint_result, lint_raw, _, lint_held = run_stage(run, "lint", tmp_path / "lint")
    assert lint_result[1] is None, lint_raw
    assert lint_held.values == {}
    assert (
        PASSWORD not in lint_raw and "MIItls" not in lint_raw and ".faasci-secrets" not in lint_raw
    )


def test_a_missing_secret_fails_the_stage_naming_its_path_and_a_short_one_is_refused(
    openbao, vault_settings, make_repo, tmp_path
):
    text = "stages:\n  unit:\n    run: 'true'\n    secrets: {X: 'nowhere/at-all#k'}\n"
    held = stage_secrets.load(make_run(make_repo, text), "unit")
    assert held.reason == "secrets" and "nowhere/at-all" in held.error and "X" in held.error
    put(openbao, REPO, "short", k="abc")
    text = "stages:\n  unit:\n    run: 'true'\n    secrets: {X: 'short#k'}\n"
    held = stage_secrets.load(make_run(make_repo, text), "unit")
    assert held.reason == "secrets" and "too short" in held.error and "abc" not in held.error
    put(openbao, REPO, "nokey", other="some-value")
    text = "stages:\n  unit:\n    run: 'true'\n    secrets: {X: 'nokey#k'}\n"
    held = stage_secrets.load(make_run(make_repo, text), "unit")
    assert "has no key 'k'" in held.error and "some-value" not in held.error


def test_another_repository_cannot_read_this_ones_secrets(openbao, vault_settings, make_repo):
    put(openbao, REPO, "db", password=PASSWORD)
    text = "stages:\n  unit:\n    run: 'true'\n    secrets: {X: 'db#password'}\n"
    run = make_run(make_repo, text)
    run.repo = "https://git.example.com/attacker/app.git"  # same path, its own folder
    held = stage_secrets.load(run, "unit")
    assert held.reason == "secrets" and held.values == {}


# The token: renewed while in use, a new login after a 403.


@pytest.fixture
def short_ttl_role(openbao, tmp_path):
    """Settings of an AppRole whose tokens live 4 s (renewable up to 120 s)."""
    root = openbao.root
    root.auth.approle.create_or_update_approle(
        "faasci-short", token_policies=["faasci-functions"], token_ttl="4s", token_max_ttl="120s"
    )
    folder = tmp_path / "short-secrets"
    folder.mkdir()
    (folder / "vault-role-id").write_text(
        root.auth.approle.read_role_id("faasci-short")["data"]["role_id"]
    )
    (folder / "vault-secret-id").write_text(
        root.auth.approle.generate_secret_id("faasci-short")["data"]["secret_id"]
    )
    return folder


def test_the_token_is_renewed_across_a_stage_longer_than_its_ttl(
    openbao, vault_settings, short_ttl_role, make_repo, tmp_path, monkeypatch
):
    from faasci import settings

    settings.configure(replace(vault_settings, secrets_dir=short_ttl_role))
    vault.reset()
    put(openbao, REPO, "db", password=PASSWORD)
    text = ("stages:\n  unit:\n    run: ['sleep 10', 'echo \"$DB_PASSWORD\" | wc -c']\n"
            "    secrets: {DB_PASSWORD: 'db#password'}\n")  # fmt: skip
    run = make_run(make_repo, text)
    client = vault.vault()
    result, raw, _, held = run_stage(run, "unit", tmp_path / "unit")
    assert result[1] is None, raw
    token = client._client.token
    assert client.logins == 1 and client.renewals >= 2  # one token, kept alive throughout
    assert openbao.root.auth.token.lookup(token)["data"]["ttl"] > 0
    assert client.read(vault.repo_path(cache.namespace_of(REPO), "db"))["password"] == PASSWORD
    assert client.logins == 1


def test_a_revoked_token_means_a_new_login_not_an_error(openbao, vault_settings):
    client = vault.vault()
    vault.platform_secret("internal-signing")
    openbao.root.auth.token.revoke(client._client.token)
    vault.reset_cache()
    assert vault.platform_secret("internal-signing")
    assert client.logins == 2


def test_the_function_token_and_vault_files_are_not_in_a_stage(
    openbao, vault_settings, make_repo, tmp_path, monkeypatch
):
    """The stage's environment has no Vault token or address; the secrets folder (with the
    AppRole ids) and OpenBao's own files are hidden."""
    from faasci import settings

    keys = openbao.server.keys_dir
    settings.configure(replace(settings.settings(), sandbox_hide=(keys, openbao.server.storage)))
    put(openbao, REPO, "db", password=PASSWORD)
    secrets_dir = settings.settings().secrets_dir
    text = (
        "stages:\n  unit:\n    run:\n"
        "      - 'env | grep -i -e vault -e token -e secret_id || true'\n"
        f"      - 'cat {secrets_dir}/vault-secret-id {secrets_dir}/vault-role-id || true'\n"
        f"      - 'cat {keys}/init.json || true; ls -la {keys} {openbao.server.storage} || true'\n"
        "    secrets: {DB_PASSWORD: 'db#password'}\n"
    )
    vault.vault().client()
    result, raw, _, _ = run_stage(make_run(make_repo, text), "unit", tmp_path / "unit")
    assert result[1] is None, raw
    token = vault.vault()._client.token
    for leak in (token, (secrets_dir / "vault-secret-id").read_text(),
                 (secrets_dir / "vault-role-id").read_text(), "root_token"):  # fmt: skip
        assert leak not in raw
    assert "VAULT_ADDR" not in raw


# Kubernetes auth, as on a cluster: OpenBao asks the (here: local) API server's TokenReview
# whether the function's service-account token is real.


@pytest.fixture
def kubernetes_auth(openbao, tmp_path):
    """OpenBao's kubernetes auth method pointed at a local TokenReview endpoint that accepts
    one service-account token; yields (token file, reviews seen)."""
    import datetime
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import jwt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "local-k8s")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))  # fmt: skip
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": "system:serviceaccount:openfaas-fn:faasci",
        "kubernetes.io/serviceaccount/namespace": "openfaas-fn",
        "kubernetes.io/serviceaccount/service-account.name": "faasci",
        "kubernetes.io/serviceaccount/service-account.uid": "0b6c2a3e-1111-2222-3333-444455556666",
    }
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    token = jwt.encode(claims, pem, algorithm="RS256")
    reviews = []

    class TokenReview(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reviews.append(body)
            ok = body["spec"]["token"] == token
            status = {"authenticated": ok}
            if ok:
                status["user"] = {"username": claims["sub"], "uid": claims[
                    "kubernetes.io/serviceaccount/service-account.uid"],
                    "groups": ["system:serviceaccounts"]}  # fmt: skip
            out = json.dumps({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                              "status": status}).encode()  # fmt: skip
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenReview)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = openbao.root
    if "kubernetes/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("kubernetes")
    root.auth.kubernetes.configure(
        kubernetes_host=f"http://127.0.0.1:{server.server_port}",
        kubernetes_ca_cert=cert.public_bytes(serialization.Encoding.PEM).decode(),
        token_reviewer_jwt=token, disable_local_ca_jwt=True,
    )  # fmt: skip
    root.auth.kubernetes.create_role(
        "faasci-functions", bound_service_account_names=["faasci"],
        bound_service_account_namespaces=["openfaas-fn"], policies=["faasci-functions"],
        ttl="1h",
    )  # fmt: skip
    token_file = tmp_path / "sa-token"
    token_file.write_text(token)
    yield token_file, reviews
    server.shutdown()
    server.server_close()


def test_kubernetes_auth_logs_in_with_the_service_account_token(vault_settings, kubernetes_auth):
    from faasci import settings

    token_file, reviews = kubernetes_auth
    settings.configure(replace(vault_settings, vault_auth="kubernetes", vault_jwt_file=token_file))
    vault.reset()
    assert vault.platform_secret("internal-signing")
    assert reviews and vault.vault().logins == 1
    token_file.write_text("not-a-real-token")
    vault.reset()
    with pytest.raises(vault.VaultError, match="kubernetes"):
        vault.platform_secret("internal-signing")
