"""The Trivy gate on the local stack: the build stage pushes the image, the real Trivy scans
it by digest from the real registry with a database in Trivy's own format (written here
into the stack's Trivy cache by scripts/trivydb), and

  (a) an image holding a package with a CVSS 9.8 vulnerability in that database stops the
      run at build (`blocked`, not retried): the report and the image reference are in S3
      under quarantine/, and `faasci show` says why and where the report is;
  (b) an image with a committed AWS key is stopped by Trivy's secret scanner;
  (c) a clean image (a Debian base with only a CVSS 5.3 finding) passes, and its CycloneDX
      SBOM is in S3.

The vulnerable package is a real dpkg package the image builds and installs (it is unique
to this test, so the database harms no other test's image); the base image's own zlib1g
carries a 5.3 advisory, found but under the threshold. The three runs go at once."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import FAASCI, log_of, start_run, wait_for_run

from faasci import scan, services

AWS_KEY_ID = "AKIA" + "2E0A8F3B244C9986"  # not the documented example key, which is allowed
AWS_SECRET = "6a7d8f2e9b1c4d3e" + "5f6a7b8c9d0e1f2a3b4c5d6e"
VULNERABLE = "faasci-test-vulnerable"  # the package the test database knows a CVE of
DATABASE = [
    {"id": "CVE-2099-0001", "source": "debian 12", "package": VULNERABLE,
     "fixed_version": "1.0-2", "title": "faasci-test-vulnerable: remote code execution",
     "severity": "CRITICAL",
     "cvss": {"nvd": {"V3Score": 9.8,
                      "V3Vector": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}}},
    {"id": "CVE-2099-0002", "source": "debian 12", "package": "zlib",
     "fixed_version": "1:99.0-1", "title": "zlib: a medium test finding", "severity": "MEDIUM",
     "cvss": {"nvd": {"V3Score": 5.3, "V3Vector": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:L/I:N/A:N"}}},
]  # fmt: skip
# A package built and installed with dpkg inside the image: Trivy reads it from dpkg's status.
INSTALL_VULNERABLE = (
    "RUN mkdir -p /tmp/pkg/DEBIAN && printf 'Package: " + VULNERABLE + "\\nVersion: 1.0-1\\n"
    "Architecture: all\\nMaintainer: faas-ci tests <tests@faasci.invalid>\\nDescription: a "
    "package with a known test CVE\\n' > /tmp/pkg/DEBIAN/control "
    "&& dpkg-deb --build /tmp/pkg /tmp/v.deb && dpkg -i /tmp/v.deb && rm -rf /tmp/pkg /tmp/v.deb\n"
)


@pytest.fixture(scope="module")
def scan_db(stack):
    """The test database in the stack's Trivy cache (in place of `faasci up`'s empty one)."""
    scan.write_db(stack.trivy_cache, DATABASE)
    return stack.trivy_cache


@pytest.fixture(scope="module")
def runs(scan_db, gateway, engine_with_base, tmp_path_factory):
    """The three pipelines started at once (each image is built once); their run ids."""
    from conftest import commit_all, git

    def repo(service: str, dockerfile: str, files: dict | None = None) -> Path:
        path = tmp_path_factory.mktemp("trivy-gate") / service
        path.mkdir()
        for name, text in {".faasci.yml": f"service: {service}\nstages:\n  build:\n"
                           "    docker: {file: Dockerfile}\n    retries: 2\n  integration:\n"
                           "    run: [\"echo integration ran\"]\n",
                           "Dockerfile": dockerfile, "app.py": "print('hello')\n",
                           **(files or {})}.items():  # fmt: skip
            (path / name).write_text(text)
        git(path, "init", "--quiet", "--initial-branch=main")
        commit_all(path, "trivy gate test")
        return path

    base = engine_with_base
    repos = {
        "cve": repo("trivy-cve", f"FROM {base}\n{INSTALL_VULNERABLE}COPY app.py /app/\n"),
        "secret": repo("trivy-secret", f"FROM {base}\nCOPY creds /app/creds\n",
                       {"creds": f"[default]\naws_access_key_id = {AWS_KEY_ID}\n"
                                 f"aws_secret_access_key = {AWS_SECRET}\n"}),
        "clean": repo("trivy-clean", f"FROM {base}\nCOPY app.py /app/\n"),
    }  # fmt: skip
    return {name: start_run(gateway, path) for name, path in repos.items()}


def build_attempts(run: dict) -> list[dict]:
    return next(s for s in run["stages"] if s["name"] == "build")["attempts"]


def test_an_image_with_a_cvss_9_8_package_is_blocked_at_build_and_quarantined(
    runs, gateway, client_settings, stack
):
    """One attempt (blocked is not retried); the error names the CVE, its score and the
    package; integration never ran; report and image reference under quarantine/; the SBOM
    beside it; `faasci show` prints why and where the report is."""
    run = wait_for_run(gateway, runs["cve"], timeout=900)
    log = log_of(gateway, run["id"], "build")
    assert run["status"] == "failed", log
    (attempt,) = build_attempts(run)
    assert attempt["reason"] == "blocked", attempt
    assert attempt["error"] == ("blocked by the image scan: CVE-2099-0001 (CVSS 9.8) in "
                                f"{VULNERABLE} 1.0-1 (fixed in 1.0-2)")  # fmt: skip
    assert not next(s for s in run["stages"] if s["name"] == "integration")["attempts"]
    assert run["image"] is None  # nothing later may use it
    record = attempt["scan"]
    assert record["passed"] is False and record["image"] == attempt["image"]
    digest = record["image"].rpartition("@")[2]
    assert record["report"] == f"quarantine/trivy-cve/{digest.replace(':', '-')}/report.json"
    store = services.objects()
    report = store.get_json(record["report"])  # Trivy's own report of the real scan
    assert report["ArtifactName"] == record["image"]
    found = [v for r in report["Results"] for v in r.get("Vulnerabilities") or []]
    assert {(v["VulnerabilityID"], v["PkgName"]) for v in found} == {
        ("CVE-2099-0001", VULNERABLE), ("CVE-2099-0002", "zlib1g")}  # fmt: skip
    quarantined = store.get_json(record["report"].replace("report.json", "image.json"))
    assert quarantined["image"] == record["image"] and quarantined["run"] == run["id"]
    assert store.head(record["sbom"])
    assert "blocking: CVE-2099-0001 (CVSS 9.8)" in log and "scan blocked the image" in log

    shown = subprocess.run([FAASCI, "show", run["id"]], capture_output=True, text=True,
                           timeout=120, env=os.environ)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "stage build failed: blocked by the image scan: CVE-2099-0001 (CVSS 9.8)" in (
        " ".join(shown.stdout.split()))  # fmt: skip
    assert f"scan report: s3://{store.bucket}/{record['report']}" in shown.stdout


def test_an_image_with_a_committed_aws_key_is_stopped_by_the_secret_scanner(
    runs, gateway, client_settings
):
    """Blocked, naming the secret and its file; neither half of the key appears in the
    log, the record or the quarantined report."""
    run = wait_for_run(gateway, runs["secret"], timeout=900)
    log = log_of(gateway, run["id"], "build")
    assert run["status"] == "failed", log
    (attempt,) = build_attempts(run)
    assert attempt["reason"] == "blocked"
    assert attempt["error"].startswith("blocked by the image scan: secret AWS")
    assert "in /app/creds" in attempt["error"]
    assert attempt["scan"]["secrets"] >= 2
    report = services.objects().get_bytes(attempt["scan"]["report"]).decode()
    for text in (log, json.dumps(run), report):
        assert AWS_KEY_ID not in text and AWS_SECRET not in text


def test_a_clean_image_passes_the_gate_and_its_sbom_is_in_s3(runs, gateway, client_settings):
    """The run passes on to integration; the 5.3 finding is counted, not blocking; the
    CycloneDX SBOM in S3 names the image by digest and lists its packages."""
    run = wait_for_run(gateway, runs["clean"], timeout=900)
    log = log_of(gateway, run["id"], "build")
    assert run["status"] == "passed", log
    record = build_attempts(run)[-1]["scan"]
    assert record["passed"] is True and record["image"] == run["image"]
    assert record["vulnerabilities"] == 1 and record["blocking"] == 0 and record["report"] is None
    digest = run["image"].rpartition("@")[2]
    assert record["sbom"] == f"sboms/trivy-clean/{digest.replace(':', '-')}.json"
    sbom = services.objects().get_json(record["sbom"])
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == run["image"]
    assert {"zlib1g", "python3"} <= {c["name"] for c in sbom["components"]}
    assert "scan passed: 1 vulnerabilities" in log
    assert "integration ran" in log_of(gateway, run["id"], "integration")
