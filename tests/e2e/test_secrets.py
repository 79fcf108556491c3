"""Stage secrets from the stack's OpenBao on the real local stack: they reach the stage that
names them and no log, record or other stage; the platform's own secret files are out of
every stage's reach; rotating the platform's secrets does not fail a running pipeline."""

import base64
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote

from conftest import FAASCI, ROOT, wait_for_run

from faasci import cache

PASSWORD = "e2e/Pa55+word&more=chars"
FORMS = {
    "plain": PASSWORD,
    "base64": base64.b64encode(PASSWORD.encode()).decode(),
    "base64url": base64.urlsafe_b64encode(PASSWORD.encode()).decode(),
    "urlencoded": quote(PASSWORD, safe=""),
}


def faasci(stack, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **stack.env()}
    return subprocess.run([FAASCI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def put_secret(gateway, repo: Path, path: str, **values) -> None:
    resp = gateway.call("secrets", values, method="PUT",
                        path=f"repos/{cache.namespace_of(str(repo))}/{path}")  # fmt: skip
    assert resp.status_code == 200, resp.text


def start(gateway, repo: Path) -> str:
    resp = gateway.call("runs", {"repo": str(repo)}, timeout=300)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def logs(gateway, run: dict) -> dict[str, str]:
    texts = {}
    for stage in run["stages"]:
        for attempt in stage["attempts"]:
            where = f"{run['id']}/{stage['name']}/{attempt['number']}"
            resp = gateway.call("pipeline-log", method="GET", path=where)
            assert resp.status_code == 200, resp.text
            texts[f"{stage['name']}/{attempt['number']}"] = resp.text
    return texts


URLENCODE = "import os, urllib.parse as u; print(u.quote(os.environ['DB_PASSWORD'], safe=''))"
PIPELINE = """
service: secret-user
stages:
  lint:
    run: ['env | sort', 'ls -la ~']
  unit:
    run:
      - 'echo "plain: $DB_PASSWORD"'
      - 'printf %s "$DB_PASSWORD" | base64'
      - 'printf %s "$DB_PASSWORD" | base64 | tr "+/" "-_"'
      - URLENCODED
      - 'echo "file at $TLS_KEY_FILE"; cat "$TLS_KEY_FILE"'
      - 'test "$(cat "$TLS_KEY_FILE")" = "tls-key-e2e-0123456789"'
    secrets:
      DB_PASSWORD: db#password
      TLS_KEY: {from: "tls#key", file: true}
  integration:
    run: ['env | sort', 'test -z "$DB_PASSWORD"', 'ls -la ~']
""".replace("URLENCODED", json.dumps(f"python3 -c {json.dumps(URLENCODE)}"))


def test_a_stage_secret_reaches_its_stage_and_no_log_record_or_other_stage(
    stack, gateway, make_repo
):
    repo = make_repo({".faasci.yml": PIPELINE, "README": "secrets\n"})
    put_secret(gateway, repo, "db", password=PASSWORD)
    put_secret(gateway, repo, "tls", key="tls-key-e2e-0123456789")
    run = wait_for_run(gateway, start(gateway, repo), timeout=300)
    texts = logs(gateway, run)
    assert run["status"] == "passed", texts
    assert "plain: ***" in texts["unit/1"]
    assert "file at " in texts["unit/1"]
    record = json.dumps(run)
    function_logs = "".join(
        (stack.logs / f"{name}.log").read_text(errors="replace")
        for name in ("unit", "lint", "integration", "runs", "secrets", "gateway")
    )
    for name, form in FORMS.items():
        for where, text in {**texts, "record": record, "function logs": function_logs}.items():
            assert form not in text, f"the {name} form of the secret is in {where}"
    assert "tls-key-e2e-0123456789" not in "".join(texts.values())
    for other in ("lint/1", "integration/1"):
        assert "DB_PASSWORD=" not in texts[other] and "TLS_KEY_FILE=" not in texts[other]
        assert ".faasci-secrets" not in texts[other]
    listed = gateway.call("secrets", method="GET",
                          path=f"repos/{cache.namespace_of(str(repo))}").json()  # fmt: skip
    assert listed["secrets"] == {"db": ["password"], "tls": ["key"]}


def test_a_missing_secret_fails_the_stage_with_its_path(gateway, make_repo):
    text = "stages:\n  unit:\n    run: 'true'\n    secrets: {X: 'not/there#k'}\n"
    run = wait_for_run(gateway, start(gateway, make_repo({".faasci.yml": text})), timeout=120)
    (attempt,) = run["stages"][0]["attempts"]
    assert run["status"] == "failed" and attempt["reason"] == "secrets"
    assert "not/there" in attempt["error"]


def test_a_stage_reading_the_platforms_secret_files_gets_nothing(stack, gateway, make_repo):
    home = stack.home
    targets = [
        stack.secrets_dir,
        stack.run / "secrets" / "unit",
        home / "openbao",
        stack.data / "openbao",
    ]
    commands = [f"cat {t}/* {t}/*/* 2>&1; ls -la {t} 2>&1; true" for t in targets]
    commands += ["env | sort", "cat /proc/1/environ | tr '\\0' '\\n' 2>&1; true"]
    text = "stages:\n  unit:\n    run:\n" + "".join(f"      - {json.dumps(c)}\n" for c in commands)
    run = wait_for_run(gateway, start(gateway, make_repo({".faasci.yml": text})), timeout=120)
    log = logs(gateway, run)["unit/1"]
    assert run["status"] == "passed", log
    secrets = [p.read_text().strip() for p in stack.secrets_dir.iterdir() if p.is_file()]
    secrets += [(home / "openbao" / "init.json").read_text()]
    root_token = json.loads(secrets[-1])["root_token"]
    for value in [*secrets, root_token]:
        if len(value) >= 8:
            assert value not in log
    assert "VAULT" not in log and "root_token" not in log


def test_rotating_the_platform_secrets_while_a_pipeline_runs_does_not_fail_it(
    stack, gateway, make_repo
):
    text = (
        "stages:\n"
        "  lint:\n    run: 'sleep 4'\n"
        "  unit:\n    run: 'sleep 4'\n"
        "  integration:\n    run: 'sleep 2'\n"
    )
    run_id = start(gateway, make_repo({".faasci.yml": text}))
    rotated, during = [], []

    def rotate():  # while lint runs: its hand-off to unit is signed with one key or the other
        time.sleep(3)
        rotated.append(faasci(stack, "secrets", "rotate", "--force"))
        during.append(gateway.call("runs", method="GET", path=run_id).json()["status"])

    worker = threading.Thread(target=rotate)
    worker.start()
    run = wait_for_run(gateway, run_id, timeout=300)
    worker.join()
    (done,) = rotated
    assert done.returncode == 0, done.stderr
    assert "rotated internal-signing" in done.stdout
    assert during == ["running"], "the rotation did not happen while the run ran"
    assert run["status"] == "passed", run
    assert [s["status"] for s in run["stages"]] == ["passed"] * 3


def test_faasci_secrets_put_ls_and_show_webhook(stack, make_repo):
    repo = make_repo({"README": "x\n"})
    done = faasci(stack, "secrets", "put", str(repo), "api", "token=api-token-0123456")
    assert done.returncode == 0, done.stderr
    listed = faasci(stack, "secrets", "ls", str(repo))
    assert listed.stdout.strip() == "api: token" and "api-token-0123456" not in listed.stdout
    short = faasci(stack, "secrets", "put", str(repo), "api", "pin=123")
    assert short.returncode == 2 and "too short" in short.stderr
    webhook = faasci(stack, "secrets", "show-webhook")
    assert webhook.returncode == 0 and len(webhook.stdout.strip()) >= 32
    assert not (stack.secrets_dir / "webhook-secret").exists()
