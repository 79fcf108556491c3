"""The deployable bundle: stack.yml follows faas-cli's schema, and a function image builds and runs.

test_bundle_check_builds_and_runs_a_function is slow: it runs scripts/bundle-check, which
installs podman and friends when missing, makes a debootstrap'ed Debian base image once
(about a minute on a fresh machine), lays out the build contexts as `faas-cli build
--shrinkwrap` does, builds one function image with podman, runs it and checks /_/health
and its non-root user over HTTP. Later runs reuse the base image and the layer cache and
take seconds. A missing tool makes it fail, never skip.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from croniter import croniter

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = "python3-ci"


def load_stack() -> dict:
    return yaml.safe_load((REPO / "stack.yml").read_text())


def test_bundle_check_builds_and_runs_a_function():
    """scripts/bundle-check builds one function image, serves /_/health and runs non-root."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "bundle-check")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHON": sys.executable},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "GET /_/health -> 200" in output, output
    uid = re.search(r"process user: uid (\d+) \(non-root", output)
    assert uid and int(uid.group(1)) != 0, output
    assert "bundle-check: OK" in output, output


def test_stack_top_level_follows_faas_cli_schema():
    """stack.yml has version 1.0, the openfaas provider with a gateway URL, and functions."""
    stack = load_stack()
    assert str(stack["version"]) == "1.0"
    assert stack["provider"]["name"] == "openfaas"
    assert re.fullmatch(r"https?://[^/\s]+(:\d+)?/?", stack["provider"]["gateway"])
    assert isinstance(stack["functions"], dict) and stack["functions"]


def test_every_function_uses_the_template_and_has_a_handler():
    """Every function is lang python3-ci with an image and a handler folder holding handler.py."""
    for name, fn in load_stack()["functions"].items():
        assert fn["lang"] == TEMPLATE, name
        assert fn.get("image"), name
        handler = REPO / fn["handler"]
        assert handler.is_dir(), f"{name}: {handler}"
        assert (handler / "handler.py").is_file(), f"{name}: no handler.py"


def test_environment_files_exist_where_faas_cli_reads_them():
    """Each environment_file exists relative to the repo root and holds an environment map."""
    for name, fn in load_stack()["functions"].items():
        for env_file in fn.get("environment_file") or []:
            path = REPO / env_file
            assert path.is_file(), f"{name}: {env_file}"
            assert isinstance(yaml.safe_load(path.read_text())["environment"], dict), env_file


def test_shared_library_is_copied_into_every_build():
    """configuration.copy lists ./shared, the folder holding the faasci package."""
    stack = load_stack()
    assert "./shared" in stack["configuration"]["copy"]
    assert (REPO / "shared" / "faasci" / "__init__.py").is_file()
    assert (REPO / "shared" / "requirements.txt").is_file()


def test_template_declares_language_and_fprocess():
    """template/python3-ci has template.yml (language, fprocess), Dockerfile and index.py."""
    folder = REPO / "template" / TEMPLATE
    meta = yaml.safe_load((folder / "template.yml").read_text())
    assert meta["language"] == TEMPLATE
    assert meta["fprocess"] == "python index.py"
    for name in ("Dockerfile", "index.py", "requirements.txt", "function/handler.py"):
        assert (folder / name).is_file(), name
    templates = load_stack()["configuration"].get("templates") or []
    assert any(t["name"] == TEMPLATE for t in templates)


def test_a_function_is_scheduled_by_cron_connector():
    """At least one function carries topic: cron-function and a valid five-field schedule."""
    scheduled = {
        name: fn["annotations"]["schedule"]
        for name, fn in load_stack()["functions"].items()
        if (fn.get("annotations") or {}).get("topic") == "cron-function"
    }
    assert scheduled, "no function has the cron-function topic"
    for name, schedule in scheduled.items():
        assert len(schedule.split()) == 5, f"{name}: cron-connector takes five fields"
        assert croniter.is_valid(schedule), f"{name}: {schedule!r}"
