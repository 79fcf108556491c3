"""The Trivy gate's verdict on a report (faasci.scan.evaluate): the CVSS threshold, ignore
entries and their expiry, secrets; and the pipeline file's `scan:` (before any scan runs).
Reports have the shape of Trivy 0.76's JSON (schema 2)."""

from datetime import date

import pytest

from faasci import scan
from faasci.errors import Unprocessable
from faasci.pipeline import parse
from faasci.scan import IgnoreEntry, ScanSpec, evaluate

TODAY = date(2026, 11, 27)


def vuln(vid: str, scores: dict[str, float] | None, pkg: str = "zlib1g", **extra) -> dict:
    """One entry of a result's Vulnerabilities, as Trivy writes it."""
    entry = {
        "VulnerabilityID": vid,
        "PkgName": pkg,
        "InstalledVersion": "1:1.2.13.dfsg-1",
        "FixedVersion": "1:99.0-1",
        "Severity": "CRITICAL",
        **extra,
    }
    if scores is not None:
        entry["CVSS"] = {source: {"V3Score": s, "V3Vector": "CVSS:3.1/AV:N"}
                         for source, s in scores.items()}  # fmt: skip
    return entry


def report(vulns: list[dict] = (), secrets: list[dict] = ()) -> dict:
    results = [{"Target": "img (debian 12.15)", "Class": "os-pkgs", "Type": "debian",
                "Vulnerabilities": list(vulns)}]  # fmt: skip
    if secrets:
        results.append({"Target": "/app/creds", "Class": "secret", "Secrets": list(secrets)})
    return {"SchemaVersion": 2, "ArtifactName": "img", "Results": results}


AWS_KEY = {"RuleID": "aws-access-key-id", "Category": "AWS", "Severity": "CRITICAL",
           "Title": "AWS Access Key ID", "StartLine": 1}  # fmt: skip


def test_a_score_at_or_over_the_threshold_blocks_and_one_under_it_does_not():
    """7.0 blocks at the default 7.0 (>=), 6.9 does not; the worst finding comes first."""
    verdict = evaluate(report([vuln("CVE-1", {"nvd": 6.9}), vuln("CVE-2", {"nvd": 7.0}),
                               vuln("CVE-3", {"nvd": 9.8})]), ScanSpec(), TODAY)  # fmt: skip
    assert verdict.blocked and [f.id for f in verdict.blocking] == ["CVE-3", "CVE-2"]
    assert verdict.vulnerabilities == 3
    assert verdict.reason() == ("CVE-3 (CVSS 9.8) in zlib1g 1:1.2.13.dfsg-1 (fixed in "
                                "1:99.0-1) and 1 more blocking finding")  # fmt: skip


def test_the_threshold_is_the_pipelines():
    """max_cvss 9.9 lets a 9.8 through; max_cvss 5 blocks a 6.9."""
    r = report([vuln("CVE-1", {"nvd": 9.8}), vuln("CVE-2", {"nvd": 6.9})])
    assert not evaluate(r, ScanSpec(max_cvss=9.9), TODAY).blocked
    assert len(evaluate(r, ScanSpec(max_cvss=5), TODAY).blocking) == 2


def test_the_score_is_the_highest_v3_score_any_source_gives():
    """NVD says 5.3, Red Hat 7.5: it blocks at 7.5; one with no v3 score never blocks."""
    r = report([vuln("CVE-1", {"nvd": 5.3, "redhat": 7.5}),
                {**vuln("CVE-2", None), "CVSS": {"nvd": {"V2Score": 10.0}}}])  # fmt: skip
    verdict = evaluate(r, ScanSpec(), TODAY)
    assert [(f.id, f.cvss) for f in verdict.blocking] == [("CVE-1", 7.5)]
    assert verdict.unscored == 1


def test_an_ignore_entry_ignores_until_its_date_inclusive():
    """An entry until today still ignores; nothing is expired."""
    spec = ScanSpec(ignore=[IgnoreEntry(id="cve-2099-0001", until=TODAY, reason="no fix yet")])
    verdict = evaluate(report([vuln("CVE-2099-0001", {"nvd": 9.8})]), spec, TODAY)
    assert not verdict.blocked
    assert verdict.ignored == ["CVE-2099-0001"] and verdict.expired == []


def test_an_expired_ignore_entry_no_longer_ignores_and_is_named():
    """Until yesterday: the vulnerability blocks again and the entry is listed as expired;
    an entry for another id changes nothing."""
    spec = ScanSpec(ignore=[IgnoreEntry(id="CVE-2099-0001", until=date(2026, 11, 26)),
                            IgnoreEntry(id="CVE-2000-1", until=date(2030, 1, 1))])  # fmt: skip
    verdict = evaluate(report([vuln("CVE-2099-0001", {"nvd": 9.8})]), spec, TODAY)
    assert verdict.blocked and verdict.worst.id == "CVE-2099-0001"
    assert [e.id for e in verdict.expired] == ["CVE-2099-0001"] and verdict.ignored == []


def test_a_secret_blocks_ranks_worst_and_is_named_by_its_file():
    """A secret blocks even with no vulnerability over the threshold, and comes before a
    9.8; `secrets: false` counts it but lets it through."""
    r = report([vuln("CVE-1", {"nvd": 9.8})], [AWS_KEY])
    verdict = evaluate(r, ScanSpec(), TODAY)
    assert verdict.worst.describe() == "secret AWS Access Key ID in /app/creds"
    assert verdict.secrets == 1 and len(verdict.blocking) == 2
    only_secret = evaluate(report([], [AWS_KEY]), ScanSpec(), TODAY)
    assert only_secret.blocked
    off = evaluate(report([], [AWS_KEY]), ScanSpec(secrets=False), TODAY)
    assert not off.blocked and off.secrets == 1


def test_a_clean_report_passes():
    """No results at all (a scratch image): nothing blocks."""
    verdict = evaluate({"SchemaVersion": 2, "Results": None}, ScanSpec(), TODAY)
    assert not verdict.blocked and verdict.reason() == "" and verdict.vulnerabilities == 0


BUILD = """\
service: s
stages:
  build:
    docker: {{file: Dockerfile}}
{scan}"""


def test_the_pipeline_file_turns_the_gate_off_or_tunes_it():
    """Default: on with 7.0; `scan: false` off; options parsed with their dates."""
    assert parse(BUILD.format(scan=""), "s").stages["build"].scan is None
    assert scan.effective(None) == ScanSpec(enabled=True, max_cvss=7.0, secrets=True)
    off = parse(BUILD.format(scan="    scan: false\n"), "s").stages["build"].scan
    assert off.enabled is False
    tuned = parse(BUILD.format(scan="    scan: {max_cvss: 9, secrets: false, ignore: "
                                    "[{id: CVE-2024-1234, until: 2027-01-31, reason: x}]}\n"),
                  "s").stages["build"].scan  # fmt: skip
    assert tuned.max_cvss == 9 and not tuned.secrets
    assert tuned.ignore[0].until == date(2027, 1, 31)


@pytest.mark.parametrize(("scan_yaml", "field"), [
    ("    scan: {max_cvss: 11}\n", "stages.build.scan.max_cvss"),
    ("    scan: {ignore: [{id: CVE-1, until: someday}]}\n", "stages.build.scan.ignore.0.until"),
    ("    scan: {ignore: [{id: CVE-1}]}\n", "stages.build.scan.ignore.0.until"),
    ("    scan: {threshold: 7}\n", "stages.build.scan.threshold"),
])  # fmt: skip
def test_a_bad_scan_option_is_a_422_naming_its_field(scan_yaml, field):
    """A score over 10, a date that is none, a missing date, an unknown option."""
    with pytest.raises(Unprocessable) as caught:
        parse(BUILD.format(scan=scan_yaml), "s")
    assert caught.value.field == field


def test_scan_on_a_stage_without_an_image_is_refused():
    """`scan` belongs with `docker`: on a stage that builds nothing it is an error."""
    with pytest.raises(Unprocessable) as caught:
        parse("service: s\nstages:\n  unit: {run: [true], scan: {max_cvss: 5}}\n", "s")
    assert caught.value.field == "stages.unit.scan"


def test_a_scan_without_a_database_is_an_infra_failure_that_says_so(tmp_path):
    """No trivy.db in the cache folder: ScanError (infra) naming the folder, no scan."""
    with pytest.raises(scan.ScanError) as caught:
        scan.scan_image("127.0.0.1:5000/x@sha256:" + "0" * 64, tmp_path / "w",
                        cache=tmp_path / "cache")  # fmt: skip
    assert caught.value.reason == "infra"
    assert f"{tmp_path / 'cache'}/db" in str(caught.value)


@pytest.mark.parametrize(("ref", "plain"), [
    ("127.0.0.1:5000/svc@sha256:ab", True),
    ("localhost:5000/svc@sha256:ab", True),
    ("[::1]:5000/svc@sha256:ab", True),
    ("registry.example.com/team/svc@sha256:ab", False),
    ("10.0.0.5:5000/svc@sha256:ab", False),
])  # fmt: skip
def test_only_a_loopback_registry_is_read_over_plain_http(ref, plain):
    """--insecure for the local stack's registry only, never for a remote one."""
    assert scan._plain_http(ref) is plain
