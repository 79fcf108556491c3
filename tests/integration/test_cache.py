"""The dependency cache against the real S3 server: the node-local layer in front of it
(hits, fills, races, damaged archives, LRU, S3 away), retention, and the invalidator's
policy on a real repository with branches and a real run store."""

import dataclasses
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from conftest import commit_all, git

from faasci import cache, invalidation, pipeline, runs, services
from faasci.cache import DependencyCache
from faasci.nodecache import LOCK, NodeCache
from faasci.objects import ObjectStore
from faasci.sandbox import stable_service_dir, stage_path
from faasci.settings import settings

SPEC = pipeline.CacheSpec(setup=["true"], paths=["deps", "~/.tool-cache"],
                          manifests=["deps.lock"])  # fmt: skip
RUNTIME = {"os": "test", "arch": "test", "workspace": "/w"}


def key_of(tmp_path: Path, lock: str = "lib==1\n") -> cache.CacheKey:
    """A key in a namespace of this test's own (a repository path under tmp_path)."""
    ns = cache.namespace_of(str(tmp_path / "repo"))
    return cache.compute_key(ns, SPEC, {"deps.lock": lock.encode()}, RUNTIME)


def made(where: Path, mark: str = "a", size: int = 1000) -> dict[str, Path]:
    """What a set-up would leave: `deps/` in a service folder and `.tool-cache` in a HOME."""
    service, home = where / "svc", where / "home"
    (service / "deps").mkdir(parents=True)
    (home / ".tool-cache").mkdir(parents=True)
    (service / "deps" / "lib.py").write_text(f"# {mark}\n" + "VALUE = 1\n" * size)
    (service / "deps" / "link").symlink_to("lib.py")
    (service / "deps" / "mark").write_text(mark)
    (home / ".tool-cache" / "blob").write_bytes(bytes(range(256)) * 64)
    return {"work": service, "home": home}


@pytest.fixture
def node(tmp_path, client_settings):
    """A node-local cache of this test's own, in front of the test stack's S3."""
    return NodeCache(tmp_path / "node", 10 * 2**30, services.dependency_cache())


def other_node(tmp_path: Path, name: str, remote: DependencyCache | None = None) -> NodeCache:
    return NodeCache(tmp_path / name, 10 * 2**30, remote or services.dependency_cache())


def s3_down(client_settings) -> DependencyCache:
    """An S3 side whose server does not answer (and is not retried for long)."""
    store = ObjectStore(dataclasses.replace(client_settings, s3_endpoint="http://127.0.0.1:9"))
    store.client = boto3.client(
        "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        aws_access_key_id="x", aws_secret_access_key="y",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )  # fmt: skip
    return DependencyCache(store)


def adopted(node: NodeCache, key, where: Path, mark: str = "a", **kw):
    """Miss, "set up", adopt: the adopted entry (its lock released on return)."""
    with node.use(key) as entry:
        assert entry is None
        return node.adopt(key, made(where, mark, **kw), SPEC.paths, service="svc", repo="r")


def assert_whole(entry, mark: str = "a") -> None:
    assert entry.path("deps/mark").read_text() == mark
    assert entry.path("deps/lib.py").read_text().startswith(f"# {mark}\n")
    assert entry.path("deps/link").is_symlink()
    assert entry.path("~/.tool-cache/blob").read_bytes() == bytes(range(256)) * 64


def test_adopt_moves_in_uploads_and_then_hits_locally(node, tmp_path, client_settings):
    """A miss says why; adopt moves the set-up's paths in (nothing copied), uploads them
    with their entry; the next use is a local hit that needs no S3 at all."""
    key = key_of(tmp_path)
    with node.use(key) as entry:
        assert entry is None and node.miss_reason(key) == "absent"
        sources = made(tmp_path / "attempt")
        inode = (sources["work"] / "deps" / "lib.py").stat().st_ino
        entry = node.adopt(key, sources, SPEC.paths, service="svc", repo="the-repo")
        assert entry.source == "setup" and entry.saved_bytes > 0 and entry.size > 0
        assert not (sources["work"] / "deps").exists()  # moved, not copied
        assert entry.path("deps/lib.py").stat().st_ino == inode
        assert_whole(entry)
    (s3_entry,) = services.dependency_cache().entries(key.namespace)
    assert s3_entry["key"] == key.value and s3_entry["size"] == entry.saved_bytes
    assert (s3_entry["service"], s3_entry["repo"], s3_entry["namespace"]) == (
        "svc", "the-repo", key.namespace)  # fmt: skip
    assert s3_entry["archive"] == f"cache/{key.namespace}/{key.value}.tar.zst"
    offline = NodeCache(node.root, node.max_bytes, s3_down(client_settings))
    with offline.use(key) as hit:
        assert hit is not None and hit.source == "local" and hit.root == entry.root
        assert hit.restore_s < 0.05 and hit.restored_bytes == entry.size
        assert_whole(hit)


def test_an_empty_node_fills_from_s3(node, tmp_path):
    """Another node unpacks the archive once ("s3"), then hits locally."""
    key = key_of(tmp_path)
    adopted(node, key, tmp_path / "attempt")
    second = other_node(tmp_path, "node2")
    with second.use(key) as entry:
        assert entry.source == "s3" and entry.restored_bytes > 0
        assert entry.root == tmp_path / "node2" / key.namespace / key.value
        assert_whole(entry)
    with second.use(key) as entry:
        assert entry.source == "local"
    assert list((tmp_path / "node2" / ".tmp").iterdir()) == []


def test_concurrent_fills_of_one_key_leave_one_whole_entry(node, tmp_path):
    """Eight stages fill one key at once: all get the same whole entry, nothing half-made
    is left behind."""
    key = key_of(tmp_path)
    adopted(node, key, tmp_path / "attempt", size=100_000)
    barrier, got, errors = threading.Barrier(8), [], []

    def stage(n):
        fresh = other_node(tmp_path, "shared-node")  # its own locks, as another process has
        try:
            barrier.wait()
            with fresh.use(key) as entry:
                assert_whole(entry)
                got.append((entry.source, entry.root))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=stage, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({root for _, root in got}) == 1 and {s for s, _ in got} <= {"s3", "local"}
    assert [p.name for p in (tmp_path / "shared-node" / key.namespace).iterdir()] == [key.value]
    assert list((tmp_path / "shared-node" / ".tmp").iterdir()) == []


def test_concurrent_adopts_of_one_key_keep_one(node, tmp_path):
    """Two stages set up one key at once: one entry wins on the node and in S3, whole;
    the loser uses the winner's."""
    key = key_of(tmp_path)
    barrier, got = threading.Barrier(2), {}

    def stage(mark):
        fresh = other_node(tmp_path, "node")
        with fresh.use(key) as entry:
            assert entry is None
            sources = made(tmp_path / mark, mark, size=50_000)
            barrier.wait()
            entry = fresh.adopt(key, sources, SPEC.paths)
            got[mark] = (entry.source, entry.root, entry.path("deps/mark").read_text())

    threads = [threading.Thread(target=stage, args=(m,)) for m in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _, _ in got.values()) == ["local", "setup"]
    assert len({(root, mark) for _, root, mark in got.values()}) == 1
    winner = next(mark for _, _, mark in got.values())
    with other_node(tmp_path, "node3").use(key) as entry:
        assert entry.source == "s3"
        assert_whole(entry, winner)


def test_a_truncated_archive_is_a_miss(node, tmp_path):
    """An archive cut short in S3 (its checksum kept): "corrupt", and nothing is left on
    the node."""
    key = key_of(tmp_path)
    adopted(node, key, tmp_path / "attempt", size=50_000)
    objects = services.objects()
    whole = objects.client.get_object(Bucket=objects.bucket, Key=key.archive)
    data, metadata = whole["Body"].read(), whole["Metadata"]
    objects.client.put_object(Bucket=objects.bucket, Key=key.archive, Body=data[: len(data) // 2],
                              Metadata=metadata)  # fmt: skip
    fresh = other_node(tmp_path, "node2")
    with fresh.use(key) as entry:
        assert entry is None and fresh.miss_reason(key) == "corrupt"
    assert not (tmp_path / "node2" / key.namespace / key.value).exists()
    assert list((tmp_path / "node2" / ".tmp").iterdir()) == []
    objects.client.put_object(Bucket=objects.bucket, Key=key.archive, Body=data,
                              Metadata={**metadata, "sha256": "0" * 64})  # fmt: skip
    with fresh.use(key) as entry:  # whole, but not what was saved
        assert entry is None and fresh.miss_reason(key) == "corrupt"


def test_lru_eviction_skips_a_held_entry_and_removes_the_oldest_unheld(tmp_path, client_settings):
    """Over its bound the node drops least recently used entries, never one in use."""
    node = NodeCache(tmp_path / "node", 10 * 2**30, services.dependency_cache())
    keys = [key_of(tmp_path, f"lib=={n}\n") for n in range(3)]
    for n, key in enumerate(keys):
        adopted(node, key, tmp_path / f"attempt{n}", mark=str(n))
    sizes = {folder: size for _, size, folder in node.entries()}
    for age, key in zip((300, 200, 100), keys, strict=True):  # keys[0] used longest ago
        stamp = time.time() - age
        os.utime(node.folder(key) / LOCK, (stamp, stamp))
    node.max_bytes = sum(sizes.values()) - 1  # one entry has to go
    with node.use(keys[0]) as held:  # the oldest, but in use (this refreshes its use)
        os.utime(held.root / LOCK, (time.time() - 300,) * 2)
        assert node.evict() == [node.folder(keys[1])]
        assert held.path("deps/mark").read_text() == "0"
    assert not node.folder(keys[1]).exists() and node.folder(keys[2]).exists()
    node.max_bytes = 0
    with node.use(keys[2]):
        assert node.evict() == [node.folder(keys[0])]  # the only one not held
    assert [folder for _, _, folder in node.entries()] == [node.folder(keys[2])]
    assert list((tmp_path / "node" / ".trash").iterdir()) == []


def test_s3_down_is_a_miss_and_adopt_still_keeps_the_entry_locally(tmp_path, client_settings):
    """S3 away: "unavailable", the set-up's result becomes a local entry all the same."""
    key = key_of(tmp_path)
    node = NodeCache(tmp_path / "node", 10 * 2**30, s3_down(client_settings))
    with node.use(key) as entry:
        assert entry is None and node.miss_reason(key) == "unavailable"
        entry = node.adopt(key, made(tmp_path / "attempt"), SPEC.paths)
        assert entry.source == "setup" and entry.saved_bytes == 0
    with node.use(key) as entry:
        assert entry.source == "local"
        assert_whole(entry)
    # an upload that fails (S3 went away after the miss) only costs the upload
    other, node.remote = key_of(tmp_path, "lib==2\n"), services.dependency_cache()
    with node.use(other) as entry:
        assert entry is None and node.miss_reason(other) == "absent"
        node.remote = s3_down(client_settings)
        entry = node.adopt(other, made(tmp_path / "attempt2"), SPEC.paths)
        assert entry.source == "setup" and entry.saved_bytes == 0
        assert_whole(entry)


def test_adopt_belongs_inside_use_after_a_miss(node, tmp_path):
    """adopt() needs a `use` block of the same key that missed (after a hit it would
    throw away what the set-up made)."""
    key = key_of(tmp_path)
    with pytest.raises(RuntimeError):
        node.adopt(key, made(tmp_path / "attempt"), SPEC.paths)
    adopted(node, key, tmp_path / "attempt2")
    with node.use(key) as entry, pytest.raises(RuntimeError):
        assert entry is not None
        node.adopt(key, made(tmp_path / "attempt3"), SPEC.paths)
    assert (tmp_path / "attempt3" / "svc" / "deps" / "mark").exists()


def test_retention_lists_only_entries_unused_past_the_limit(node, tmp_path):
    """unused_since(30) lists entries last used 31 days ago, not those used 29 days ago;
    remove() deletes the archive and its entry."""
    store = services.dependency_cache()
    ages = {"lib==old\n": 31, "lib==recent\n": 29}
    for n, (lock, days) in enumerate(ages.items()):
        key = key_of(tmp_path, lock)
        adopted(node, key, tmp_path / f"attempt{n}")
        entry = services.objects().get_json(key.entry)
        entry["last_used"] = (datetime.now(UTC) - timedelta(days=days)).isoformat()
        services.objects().put_json(key.entry, entry)
    namespace = key_of(tmp_path).namespace
    expired = [e for e in store.unused_since(30) if e["namespace"] == namespace]
    assert [e["key"] for e in expired] == [key_of(tmp_path, "lib==old\n").value]
    store.remove(expired[0])
    assert [e["key"] for e in store.entries(namespace)] == [key_of(tmp_path, "lib==recent\n").value]
    assert services.objects().keys(expired[0]["archive"]) == []


# The invalidator: keys some branch or recent run needs stay, the rest go.

PIPELINE = """\
service: same-name
cache:
  manifests: [deps.lock]
  paths: [deps]
  setup: ["mkdir -p deps"]
stages:
  unit: {run: ["true"]}
"""


def stage_key(repo: Path, commit: str | None = None) -> str:
    """The key a stage of this node computes for the repository at `commit` (HEAD)."""
    spec = pipeline.parse(PIPELINE, "x").cache
    commit = commit or git(repo, "rev-parse", "HEAD")
    manifests = cache.manifests_at_commit(spec, str(repo), commit)
    s = settings()
    runtime = cache.stage_runtime(stage_path(stable_service_dir("")), s.workspace)
    return cache.compute_key(cache.namespace_of(str(repo)), spec, manifests, runtime).value


def put_entry(repo: Path, key: str) -> None:
    """An entry (archive and JSON) in the repository's namespace, as a stage would leave."""
    ns = cache.namespace_of(str(repo))
    objects = services.objects()
    objects.client.put_object(Bucket=objects.bucket, Key=cache.object_name(ns, key, "tar.zst"),
                              Body=b"x")  # fmt: skip
    now = datetime.now(UTC).isoformat()
    objects.put_json(cache.object_name(ns, key, "json"), {
        "namespace": ns, "service": "same-name", "repo": str(repo), "key": key,
        "archive": cache.object_name(ns, key, "tar.zst"), "created": now, "last_used": now,
        "size": 1,
    })  # fmt: skip


def keys_in(repo: Path) -> set[str]:
    return {e["key"] for e in services.dependency_cache().entries(cache.namespace_of(str(repo)))}


def test_a_feature_branch_manifest_change_leaves_mains_key(make_repo, client_settings):
    """A push to a feature branch changing a manifest removes only what no branch needs:
    main's key stays, the branch's stays, an orphan goes; a run's recent key stays too."""
    repo = make_repo({"deps.lock": "lib==1\n", ".faasci.yml": PIPELINE}, name="inv-branch")
    main_key = stage_key(repo)
    git(repo, "checkout", "--quiet", "-b", "feature")
    (repo / "deps.lock").write_text("lib==2\n")
    head = commit_all(repo, "bump lib on a branch")
    feature_key = stage_key(repo)
    assert feature_key != main_key
    for key in (main_key, feature_key, "0" * 32, "1" * 32):
        put_entry(repo, key)
    run = runs.new_run(pipeline.parse(PIPELINE, "x"), repo=str(repo), ref="old", commit=head,
                       source=str(repo))  # fmt: skip
    run.stages[0].attempts = [runs.Attempt(number=1, cache={"key": "1" * 32, "hit": False})]
    services.run_store().create(run)  # a run used "1"*32 today
    report = invalidation.check(str(repo), head, ["deps.lock"])
    assert keys_in(repo) == {main_key, feature_key, "1" * 32}
    assert [e["key"] for e in report["removed"]] == ["0" * 32]
    assert sorted(report["kept"]) == sorted([main_key, feature_key, "1" * 32])
    assert report["current"] == [feature_key]
    # nothing of the cache among the changed paths: nothing is even looked at
    quiet = invalidation.check(str(repo), head, ["README.md"])
    assert quiet["removed"] == [] and quiet["reason"] == "no manifest changed"


def test_a_key_no_branch_uses_is_removed(make_repo, client_settings):
    """After main's manifest changes, the key of the old manifest goes (no branch computes
    it, no recent run recorded it); a repository declaring the same `service:` is another
    namespace, untouched."""
    repo = make_repo({"deps.lock": "lib==1\n", ".faasci.yml": PIPELINE}, name="inv-orphan")
    twin = make_repo({"deps.lock": "lib==1\n", ".faasci.yml": PIPELINE}, name="inv-twin")
    old = stage_key(repo)
    assert stage_key(twin) == old  # same manifests and runtime: same key ...
    assert cache.namespace_of(str(twin)) != cache.namespace_of(str(repo))  # ... elsewhere
    put_entry(repo, old)
    put_entry(twin, old)
    (repo / "deps.lock").write_text("lib==2\n")
    commit_all(repo, "bump lib")
    new = stage_key(repo)
    put_entry(repo, new)
    report = invalidation.check(str(repo), None)
    assert keys_in(repo) == {new} and [e["key"] for e in report["removed"]] == [old]
    assert keys_in(twin) == {old}
    assert [e["repo"] for e in invalidation.listed(repo=str(twin))] == [str(twin)]
    named = {(e["repo"], e["key"]) for e in invalidation.listed(service="same-name")}
    assert {(str(repo), new), (str(twin), old)} <= named
