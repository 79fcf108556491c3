"""The dependency cache in real runs: hits skip the set-up (from this node's layer),
changed manifests miss, the cache-invalidator removes only what no branch or recent run
needs (once a stage has made a new key), damaged archives are misses, retention."""

import json
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta

from conftest import FAASCI, commit_all, git, wait_for_run

from faasci import cache, services


def cached_repo(make_repo, tmp_path, service: str):
    """A repository whose set-up "downloads" (says so in the stage's log: a stage's /tmp
    and everything outside its workspace are its own, so the log is where it shows)."""
    repo = make_repo({
        "deps.lock": "lib==1.0\n",
        ".faasci.yml": f"""\
service: {service}
cache:
  manifests: [deps.lock]
  paths: [deps]
  setup: ["echo downloading; mkdir -p deps; cp deps.lock deps/installed"]
stages:
  unit:
    run: ["cat deps/installed"]
""",
    }, name=service)  # fmt: skip
    return repo


def set_up(gateway, run: dict) -> bool:
    """Did the run's set-up run (its log says it downloaded)?"""
    log = gateway.call("pipeline-log", method="GET", path=f"{run['id']}/unit/1").text
    return "downloading" in log.splitlines()


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


def keys_of(gateway, repo) -> set[str]:
    """The keys in the repository's namespace."""
    found = gateway.call("cache-invalidator", method="GET", query={"repo": str(repo)}).json()
    return {e["key"] for e in found["entries"]}


def put_orphan(repo, key: str) -> None:
    """An entry in the repository's namespace that no branch and no run needs."""
    ns, objects = cache.namespace_of(str(repo)), services.objects()
    archive = cache.object_name(ns, key, "tar.zst")
    objects.client.put_object(Bucket=objects.bucket, Key=archive, Body=b"x")
    now = datetime.now(UTC).isoformat()
    objects.put_json(cache.object_name(ns, key, "json"), {
        "namespace": ns, "service": "orphan", "repo": str(repo), "key": key, "archive": archive,
        "created": now, "last_used": now, "size": 1,
    })  # fmt: skip


def wait_for_keys(gateway, repo, expected: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (found := keys_of(gateway, repo)) != expected:
        assert time.monotonic() < deadline, f"keys {found}, expected {expected}"
        time.sleep(0.5)


def drop_node_entry(stack, repo, key: str) -> None:
    """Forget the node-local copy, so the next run reads S3."""
    shutil.rmtree(stack.cache_dir / cache.namespace_of(str(repo)) / key)


def test_second_run_restores_and_skips_the_setup(gateway, make_repo, tmp_path):
    """Run twice without a manifest change: the second is a hit from this node's layer
    and downloads nothing."""
    repo = cached_repo(make_repo, tmp_path, "cache-hit")
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
    assert report["source"] == "local" and report["restored_bytes"] > 0
    assert report["setup_s"] == 0 and report["restore_s"] < 0.5
    assert set_up(gateway, first) and not set_up(gateway, second)
    log = gateway.call("pipeline-log", method="GET", path=f"{second['id']}/unit/1").text
    assert "cache hit" in log and "lib==1.0" in log


def test_changed_manifest_misses_and_the_invalidator_keeps_what_is_needed(
    gateway, make_repo, tmp_path, client_settings, webhook
):
    """A manifest change misses and builds a fresh cache. The check a new key brings
    (whatever started the run: `faasci run`, a push) removes only what nothing needs: the
    old key stays (a run of the last days used it), the new one stays (main's head computes
    it), orphans go."""
    repo = cached_repo(make_repo, tmp_path, "cache-change")
    old = cache_of(run_of(gateway, repo))["key"]
    put_orphan(repo, "0" * 32)
    (repo / "deps.lock").write_text("lib==2.0\n")
    commit_all(repo, "bump lib")
    changed = run_of(gateway, repo)
    new = cache_of(changed)
    assert new["hit"] is False and new["key"] != old and new["saved_bytes"] > 0
    assert set_up(gateway, changed)
    wait_for_keys(gateway, repo, {old, new["key"]})
    put_orphan(repo, "1" * 32)
    (repo / "deps.lock").write_text("lib==2.1\n")
    head = commit_all(repo, "bump lib again")
    push = {"ref": "refs/heads/main", "after": head,
            "repository": {"clone_url": f"file://{repo}"},
            "commits": [{"id": head, "modified": ["deps.lock"]}]}  # fmt: skip
    resp = webhook(push)  # signed, as the git host sends it
    assert resp.status_code == 202, resp.text
    newer = cache_of(wait_for_run(gateway, resp.json()["run_id"]))["key"]
    wait_for_keys(gateway, repo, {old, new["key"], newer})  # file://<repo>: the same repository
    # asked directly, with no manifest among the changed paths, it removes nothing
    put_orphan(repo, "2" * 32)
    report = gateway.call("cache-invalidator", {"repo": str(repo), "ref": "main",
                                                "changed": ["README.md"]}).json()  # fmt: skip
    assert report["removed"] == [] and report["reason"] == "no manifest changed"
    assert "2" * 32 in keys_of(gateway, repo)


def test_a_feature_branch_push_leaves_mains_entry(gateway, make_repo, tmp_path, webhook):
    """A push to a feature branch that changes a manifest: its run makes a key of its
    own, and main's entry stays in place."""
    repo = cached_repo(make_repo, tmp_path, "cache-branch")
    main_key = cache_of(run_of(gateway, repo))["key"]
    git(repo, "checkout", "--quiet", "-b", "feature")
    (repo / "deps.lock").write_text("lib==3.0\n")
    head = commit_all(repo, "bump lib on a branch")
    push = {"ref": "refs/heads/feature", "after": head,
            "repository": {"clone_url": str(repo)},
            "commits": [{"id": head, "modified": ["deps.lock"]}]}  # fmt: skip
    resp = webhook(push)  # signed, as the git host sends it
    assert resp.status_code == 202, resp.text
    run = wait_for_run(gateway, resp.json()["run_id"])
    assert run["status"] == "passed" and cache_of(run)["key"] != main_key
    wait_for_keys(gateway, repo, {main_key, cache_of(run)["key"]})


def test_a_truncated_archive_is_a_miss_not_a_failure(gateway, make_repo, tmp_path, stack,
                                                     client_settings):  # fmt: skip
    """An archive cut short in S3, on a node without the entry: the next run misses, sets
    up again (and saves a whole archive) and passes."""
    repo = cached_repo(make_repo, tmp_path, "cache-torn")
    key = cache_of(run_of(gateway, repo))["key"]
    objects = services.objects()
    name = cache.object_name(cache.namespace_of(str(repo)), key, "tar.zst")
    whole = objects.client.get_object(Bucket=objects.bucket, Key=name)
    data, metadata = whole["Body"].read(), whole["Metadata"]
    objects.client.put_object(Bucket=objects.bucket, Key=name, Body=data[:-20], Metadata=metadata)
    drop_node_entry(stack, repo, key)
    run = run_of(gateway, repo)
    assert run["status"] == "passed"
    assert cache_of(run)["hit"] is False and cache_of(run)["reason"] == "corrupt"
    assert set_up(gateway, run)
    drop_node_entry(stack, repo, key)
    again = cache_of(run_of(gateway, repo))
    assert again["hit"] is True and again["source"] == "s3"


def test_retention_and_the_cache_commands(stack, gateway, make_repo, tmp_path,
                                          client_settings):  # fmt: skip
    """`faasci cache ls` lists entries; the nightly round purges only those unused for 30 days;
    `faasci cache purge --service` removes a service's entries."""
    env = {**os.environ, **stack.env()}
    ages = {"cache-aged": 31, "cache-fresh": 29}
    for service, days in ages.items():
        repo = cached_repo(make_repo, tmp_path, service)
        key = cache_of(run_of(gateway, repo))["key"]
        entry_key = cache.object_name(cache.namespace_of(str(repo)), key, "json")
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
