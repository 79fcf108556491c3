"""A stage's environment on the real local stack: the project's own, out of reach of the
platform, at a stable path, and nothing left running after it."""

import time

import psutil
import pytest
from conftest import commit_all, log_of, wait_for_run

MARK = "sleep 8642"  # this file's stray processes, told apart by their argument


def start(gateway, repo) -> str:
    resp = gateway.call("runs", {"repo": str(repo)})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def strays() -> list[psutil.Process]:
    """The `sleep`s this file's commands start (not the shells that name them)."""
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "sleep" and MARK in " ".join(p.info["cmdline"] or [])]  # fmt: skip


@pytest.fixture
def kill_strays():
    """Kills what a failing test left running."""
    yield
    for proc in strays():
        proc.kill()


def test_a_stage_sees_nothing_of_the_platform(stack, gateway, make_repo, kill_strays):
    """No faas-ci packages, no secrets, a clean PATH, the stable workspace, no strays."""
    secrets = stack.secrets_dir
    assert (secrets / "s3-secret-key").exists()
    repo = make_repo(
        {
            ".faasci.yml": (
                "service: probe\n"
                "stages:\n"
                "  unit:\n"
                "    run:\n"
                "      - \"! python3 -c 'import faasci'\"\n"
                "      - \"! python3 -c 'import nats'\"\n"
                f'      - "test -z \\"$(ls -A {secrets} 2>/dev/null)\\""\n'
                f'      - "! cat {secrets}/s3-secret-key"\n'
                f'      - "! ls {stack.home}/data"\n'
                "      - 'echo \"cwd=$PWD home=$HOME path=$PATH\"'\n"
                "      - 'env | sort'\n"
                f"      - \"(setsid sh -c '{MARK}' &); sh -c '({MARK}.5 &) &'; sleep 0.3\"\n"
            ),
        }
    )
    run = wait_for_run(gateway, start(gateway, repo))
    log = log_of(gateway, run["id"], "unit")
    assert run["status"] == "passed", log
    secret = (secrets / "s3-secret-key").read_text().strip()
    assert secret not in log
    cwd = next(line for line in log.splitlines() if line.startswith("cwd="))
    assert cwd.startswith("cwd=/tmp/faasci-workspace/src home=/tmp/faasci-workspace/home")
    assert ".venv/bin" not in cwd.split("path=")[1].split(":", 2)[-1]  # only the project's
    names = {line.split("=", 1)[0] for line in log.splitlines() if "=" in line and
             line.split("=", 1)[0].isupper()}  # fmt: skip
    assert not names & {"NATS_URL", "S3_ENDPOINT", "GATEWAY_URL", "FAASCI_SECRETS_DIR",
                        "VIRTUAL_ENV", "PYTHONPATH"}  # fmt: skip
    assert {"CI", "FAASCI_RUN_ID", "FAASCI_COMMIT", "FAASCI_STAGE"} <= names
    time.sleep(0.5)
    assert strays() == []


def test_a_cancel_leaves_no_process_behind(stack, gateway, make_repo, kill_strays):
    """Cancelling a running stage ends its daemons and setsid children too."""
    repo = make_repo(
        {
            ".faasci.yml": (
                "service: long\n"
                "stages:\n"
                "  unit:\n"
                f"    run: [\"(setsid sh -c '{MARK}' &); sh -c '({MARK}.5 &) &'; {MARK}.25\"]\n"
            ),
        }
    )
    run_id = start(gateway, repo)
    deadline = time.monotonic() + 60
    while len(strays()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(strays()) == 3
    assert gateway.call("runs", {}, path=f"{run_id}/cancel").status_code in (200, 202)
    run = wait_for_run(gateway, run_id)
    assert run["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while strays() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert strays() == []


def test_a_virtualenv_from_the_set_up_works_in_every_later_stage(stack, gateway, make_repo):
    """`python -m venv .venv && .venv/bin/pip install -e .` in the set-up: the console
    script and the editable install work in every stage and run that restores it, and the
    commit's own code is what runs."""
    repo = make_repo(
        {
            "pyproject.toml": (
                '[build-system]\nrequires = ["setuptools>=61"]\n'
                'build-backend = "setuptools.build_meta"\n'
                '[project]\nname = "greeter"\nversion = "1.0"\n'
                '[project.scripts]\ngreet = "greeter:main"\n'
                '[tool.setuptools]\npackages = ["greeter"]\n'
            ),
            "greeter/__init__.py": "def main():\n    print('hello from v1')\n",
            ".faasci.yml": (
                "service: greeter\n"
                "cache:\n"
                "  paths: [.venv]\n"
                "  setup: ['python3 -m venv .venv', '.venv/bin/pip install -q -e .']\n"
                "stages:\n"
                "  lint: {run: ['greet', '.venv/bin/greet']}\n"
                "  unit: {run: [\"python -c 'import greeter; greeter.main()'\"]}\n"
                "  integration: {run: ['.venv/bin/python -m greeter || greet']}\n"
            ),
        }
    )
    first = wait_for_run(gateway, start(gateway, repo), timeout=300)
    assert first["status"] == "passed", log_of(gateway, first["id"], "lint")
    caches = [s["attempts"][0]["cache"] for s in first["stages"]]
    assert caches[0]["hit"] is False and all(c["hit"] for c in caches[1:])
    assert "hello from v1" in log_of(gateway, first["id"], "unit")
    # The next commit changes the code, not the manifests: a hit, running the new code.
    (repo / "greeter" / "__init__.py").write_text("def main():\n    print('hello from v2')\n")
    commit_all(repo, "v2")
    second = wait_for_run(gateway, start(gateway, repo))
    assert second["status"] == "passed"
    assert all(s["attempts"][0]["cache"]["hit"] for s in second["stages"])
    for stage in ("lint", "unit"):
        assert "hello from v2" in log_of(gateway, second["id"], stage)


def test_two_repositories_with_one_service_name_never_share_a_cache(stack, gateway, make_repo):
    """The cache belongs to the repository, not to the `service:` name it declares."""
    pipeline = (
        "service: same-name\n"
        "cache: {paths: [deps], setup: ['mkdir deps && echo $FAASCI_RUN_ID > deps/who']}\n"
        "stages:\n  unit: {run: ['cat deps/who']}\n"
    )
    runs = []
    for name in ("victim", "attacker"):
        repo = make_repo({".faasci.yml": pipeline, "requirements.txt": "same\n"}, name=name)
        runs.append(wait_for_run(gateway, start(gateway, repo)))
    victim, attacker = (r["stages"][0]["attempts"][0]["cache"] for r in runs)
    # Same manifests, set-up and runtime: the same key, in namespaces of their own.
    assert victim["key"] == attacker["key"]
    assert victim["hit"] is False and attacker["hit"] is False
    assert runs[1]["id"] in log_of(gateway, runs[1]["id"], "unit")


def test_a_stage_in_a_container_image(stack, gateway, make_repo, engine_with_base):
    """`image:` runs the commands in a container of that image, at the same stable path."""
    repo = make_repo(
        {
            ".faasci.yml": (
                "service: boxed\n"
                "stages:\n"
                f"  unit: {{image: '{engine_with_base}', "
                "run: ['cat /etc/debian_version', 'pwd', 'test -f .faasci.yml', 'id -u']}\n"
            ),
        }
    )
    run = wait_for_run(gateway, start(gateway, repo), timeout=180)
    log = log_of(gateway, run["id"], "unit")
    assert run["status"] == "passed", log
    assert "/tmp/faasci-workspace/src\n" in log
