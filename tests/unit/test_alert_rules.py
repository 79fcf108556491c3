"""The alert rules (shared/observability/alert-rules.yml) pass `promtool check rules`, and
their unit tests (alert-rules.test.yml) pass `promtool test rules`."""

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "shared" / "observability"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed (Debian's prometheus package): ./scripts/install")
    return found


def test_the_rules_are_valid():
    """`promtool check rules` accepts the rules file and finds every alert in it."""
    done = subprocess.run([promtool(), "check", "rules", "alert-rules.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rules_unit_tests_pass():
    """`promtool test rules`: the 5% rule fires at 6% and not at 4%, and every other rule
    fires on its synthetic series."""
    done = subprocess.run([promtool(), "test", "rules", "alert-rules.test.yml"], cwd=RULES,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_case():
    """Each alert of the rules file is expected to fire somewhere in its unit tests."""
    import yaml

    rules = yaml.safe_load((RULES / "alert-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((RULES / "alert-rules.test.yml").read_text())["tests"]
    firing = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])
              if case["exp_alerts"]}  # fmt: skip
    assert {"FaasciPipelineErrorRate", "FaasciQueueBacklog", "FaasciRunsStuck",
            "FaasciSlackAlertsFailing", "FaasciBudget80Percent"} <= alerts  # fmt: skip
    assert alerts == firing
