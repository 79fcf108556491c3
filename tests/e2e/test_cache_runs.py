"""The dependency cache in real runs: hits skip the set-up, changed manifests miss, the
cache-invalidator removes stale entries, damaged archives are misses, retention."""

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import commit_all, wait_for_run

from faasci import services

FAASCI = str(Path(sys.executable).parent / "faasci")


def cached_repo(make_repo, tmp_path, service: str):
    """A repository whose set-up "downloads" (records a line in a file outside the checkout)."""
    downloads = tmp_path / f"{service}-downloads"
    repo = make_repo({
        "deps.lock": "lib==1.0\n",
        ".faasci.yml": f"""\
service: {service}
cache:
  manifests: [deps.lock]
  paths: [deps]
  setup: ["echo downloading >> {downloads}; mkdir -p deps; cp deps.lock deps/installed"]
stages:
  unit:
    run: ["cat deps/installed"]
""",
    }, name=service)  # fmt: skip
    return repo, downloads


def run_of(gateway, repo) -> dict:
    resp = gateway.call("runs", {"repo": str(repo)})
    assert resp.status_code == 201, resp.text
    return wait_for_run(gateway, resp.json()["id"])


def cache_of(run: dict) -> dict:
    return run["stages"][0]["attempts"][-1]["cache"]


def entries(gateway, service: str) -> list[dict]:
    return gateway.call("cache-invalidator", method="GET", query={"service": service}).json()[
        "entries"
    ]


def test_second_run_restores_and_skips_the_setup(gateway, make_repo, tmp_path):
    """Run twice without a manifest change: the second is a hit and downloads nothing."""
    repo, downloads = cached_repo(make_repo, tmp_path, "cache-hit")
    first = run_of(gateway, repo)
    assert first["status"] == "passed"
    assert cache_of(first)["hit"] is False and cache_of(first)["reason"] == "absent"
    assert cache_of(first)["saved_bytes"] > 0 and cache_of(first)["setup_s"] > 0
    (repo / "README.md").write_text("docs change, manifests untouched\n")
    commit_all(repo, "docs")
    second = run_of(gateway, repo)
    assert second["status"] == "passed"
    report = cache_of(second)
    assert report["hit"] is True and report["key"] == cache_of(first)["key"]
    assert report["restored_bytes"] > 0 and report["setup_s"] == 0
    assert downloads.read_text().splitlines() == ["downloading"]  # only the first run
    log = gateway.call("pipeline-log", method="GET", path=f"{second['id']}/unit/1").text
    assert "cache hit" in log and "set-up skipped" in log and "lib==1.0" in log


def test_changed_manifest_misses_and_the_invalidator_drops_the_stale_entry(
    gateway, make_repo, tmp_path
):
    """A manifest change misses and builds a fresh cache; the push removes the old entry."""
    repo, downloads = cached_repo(make_repo, tmp_path, "cache-change")
    old = cache_of(run_of(gateway, repo))["key"]
    (repo / "deps.lock").write_text("lib==2.0\n")
    head = commit_all(repo, "bump lib")
    changed = run_of(gateway, repo)
    new = cache_of(changed)
    assert new["hit"] is False and new["key"] != old and new["saved_bytes"] > 0
    assert len(downloads.read_text().splitlines()) == 2
    assert {e["key"] for e in entries(gateway, "cache-change")} == {old, new["key"]}
    push = {"ref": "refs/heads/main", "after": head,
            "repository": {"clone_url": f"file://{repo}"},
            "commits": [{"id": head, "modified": ["deps.lock"]}]}  # fmt: skip
    assert gateway.call("webhook", push).status_code == 202
    deadline = time.monotonic() + 60
    while {e["key"] for e in entries(gateway, "cache-change")} != {new["key"]}:
        assert time.monotonic() < deadline, "the stale entry was not removed"
        time.sleep(0.5)
    # asked directly, with no manifest among the changed paths, it removes nothing
    report = gateway.call("cache-invalidator", {"repo": str(repo), "ref": "main",
                                                "changed": ["README.md"]}).json()  # fmt: skip
    assert report["removed"] == [] and report["reason"] == "no manifest changed"


def test_a_truncated_archive_is_a_miss_not_a_failure(gateway, make_repo, tmp_path,
                                                     client_settings):  # fmt: skip
    """An archive cut short in S3: the next run misses, sets up again and passes."""
    repo, downloads = cached_repo(make_repo, tmp_path, "cache-torn")
    key = cache_of(run_of(gateway, repo))["key"]
    objects = services.objects()
    name = f"cache/cache-torn/{key}.tar.gz"
    whole = objects.client.get_object(Bucket=objects.bucket, Key=name)
    data, metadata = whole["Body"].read(), whole["Metadata"]
    objects.client.put_object(Bucket=objects.bucket, Key=name, Body=data[:-20], Metadata=metadata)
    run = run_of(gateway, repo)
    assert run["status"] == "passed"
    assert cache_of(run)["hit"] is False and cache_of(run)["reason"] == "corrupt"
    assert len(downloads.read_text().splitlines()) == 2
    assert run_of(gateway, repo)["stages"][0]["attempts"][0]["cache"]["hit"] is True


def test_retention_and_the_cache_commands(stack, gateway, make_repo, tmp_path,
                                          client_settings):  # fmt: skip
    """`faasci cache ls` lists entries; the nightly round purges only those unused for 30 days;
    `faasci cache purge --service` removes a service's entries."""
    env = {**os.environ, **stack.env()}
    ages = {"cache-aged": 31, "cache-fresh": 29}
    for service, days in ages.items():
        repo, _ = cached_repo(make_repo, tmp_path, service)
        key = cache_of(run_of(gateway, repo))["key"]
        entry_key = f"cache/{service}/{key}.json"
        entry = services.objects().get_json(entry_key)
        entry["last_used"] = (datetime.now(UTC) - timedelta(days=days)).isoformat()
        services.objects().put_json(entry_key, entry)
    listed = subprocess.run([FAASCI, "cache", "ls", "--json"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert {"cache-aged", "cache-fresh"} <= {e["service"] for e in json.loads(listed.stdout)}
    nightly = gateway.call(
        "cache-invalidator",
        b"",
        headers={"X-Topic": "cron-function", "X-Connector": "cron-connector"},
    )
    assert nightly.status_code == 200, nightly.text
    expired = {e["service"] for e in nightly.json()["expired"]}
    assert "cache-aged" in expired and "cache-fresh" not in expired
    assert entries(gateway, "cache-aged") == [] and len(entries(gateway, "cache-fresh")) == 1
    purged = subprocess.run([FAASCI, "cache", "purge", "--service", "cache-fresh"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert purged.returncode == 0 and "removed 1 entries" in purged.stdout
    assert entries(gateway, "cache-fresh") == []
    refused = gateway.call("cache-invalidator", {}, path="purge")
    assert refused.status_code == 400 and refused.json()["field"] == "body"
