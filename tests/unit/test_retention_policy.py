"""Registry retention's decision on plain data: old and unreferenced goes; referenced,
recently promoted, young or undated stays, each with its reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from faasci import pipeline, registry, retention
from faasci.retention import Image, decide
from faasci.runs import new_run

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def image(n: int, age_days: float | None, tags=("v1",)) -> Image:
    created = None if age_days is None else NOW - timedelta(days=age_days)
    return Image(repository="127.0.0.1:5000/svc", digest=f"sha256:{n:064x}", tags=list(tags),
                 created=created, size=100 * n)  # fmt: skip


def test_old_unreferenced_is_deleted_and_the_rest_kept_with_why():
    """Of five images only the old, unreferenced, unpromoted one goes; the others say why."""
    old, referenced, promoted, young, undated = (image(1, 45), image(2, 90), image(3, 60),
                                                 image(4, 3), image(5, None))  # fmt: skip
    decision = decide([old, referenced, promoted, young, undated], {referenced.digest},
                      {promoted.digest}, NOW, 30)  # fmt: skip
    assert [i.digest for i in decision.delete] == [old.digest]
    why = {k["digest"]: k["why"] for k in decision.kept}
    assert why[referenced.digest] == "referenced by an environment repository"
    assert why[promoted.digest] == "promoted by a run of the last 30 days"
    assert why[young.digest].startswith("younger than 30 days")
    assert why[undated.digest].startswith("its age is unknown")


def test_the_period_is_a_setting(monkeypatch):
    """FAASCI_RETENTION_DAYS moves the line: a 45-day-old image stays under 60 days."""
    monkeypatch.setenv("FAASCI_RETENTION_DAYS", "60")
    assert retention.retention_days() == 60
    assert decide([image(1, 45)], set(), set(), NOW, retention.retention_days()).delete == []


def test_digests_are_found_in_any_file_format(tmp_path):
    """An environment repository's digests are found in YAML, JSON or prose alike."""
    import subprocess

    a, b = f"sha256:{'a' * 64}", f"sha256:{'b' * 64}"
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "values.yaml").write_text(f"image:\n  digest: {a}\n")
    (tmp_path / "env" / "notes.json").write_text(f'{{"images": ["x@{b}"], "short": "sha256:ab"}}')
    git = ["git", "-C", str(tmp_path / "env"), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "env"], check=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert retention.digests_in(str(tmp_path / "env"), "main", scratch) == {a, b}


def test_an_unreadable_environment_repository_stops_the_round(tmp_path):
    """A repository that cannot be cloned raises Unreadable (nothing may be deleted)."""
    import pytest

    with pytest.raises(retention.Unreadable, match="could not be read"):
        retention.digests_in(str(tmp_path / "missing"), "main", tmp_path)


def test_recent_runs_name_environments_and_promoted_images(monkeypatch):
    """A run's promote stage names its gitops repository; where promote passed, the run's
    image counts as promoted; where it did not, it does not."""
    monkeypatch.setenv("FAASCI_ENV_REPOS", "https://git.example/envs-extra.git#prod")
    spec = pipeline.validate({"service": "svc", "stages": {
        "unit": {"run": ["true"]},
        "promote": {"gitops": {"repository": "https://git.example/envs.git", "branch": "main",
                               "environments": {"staging": {"refs": ["main"],
                                                            "file": "staging/values.yaml"}}}}},
    })  # fmt: skip
    fields = {"repo": "/r", "ref": "main", "commit": "c" * 40, "source": "/r"}
    passed, failed = new_run(spec, **fields), new_run(spec, **fields)
    passed.image = f"127.0.0.1:5000/svc@sha256:{'1' * 64}"
    passed.stage("promote").status = "passed"
    failed.image = f"127.0.0.1:5000/svc@sha256:{'2' * 64}"
    failed.stage("promote").status = "failed"
    assert retention.environment_repositories([passed, failed]) == {
        ("https://git.example/envs.git", "main"),
        ("https://git.example/envs-extra.git", "prod"),
    }
    assert retention.promoted_digests([passed, failed]) == {f"sha256:{'1' * 64}"}


def test_created_dates_with_nanoseconds_parse():
    """An image config's RFC 3339 `created` (nanoseconds, Z) parses; junk is unknown."""
    parsed = registry._parse_time("1970-01-02T00:00:00.123456789Z")
    assert parsed == datetime(1970, 1, 2, 0, 0, 0, 123456, tzinfo=UTC)
    assert registry._parse_time("yesterday") is None
