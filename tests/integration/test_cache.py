"""The dependency cache against the real S3 server: round trips, concurrent saves of one
key, damaged archives, retention."""

import threading
from datetime import UTC, datetime, timedelta

import pytest

from faasci import cache, pipeline, services

SPEC = pipeline.CacheSpec(setup=["true"], paths=["deps", "~/.tool-cache"],
                          manifests=["deps.lock"])  # fmt: skip


@pytest.fixture
def dirs(tmp_path):
    """A service folder with a manifest and filled dependencies, an empty home, a scratch."""
    service, home, scratch = tmp_path / "svc", tmp_path / "home", tmp_path / "scratch"
    for d in (service / "deps", home / ".tool-cache", scratch):
        d.mkdir(parents=True)
    (service / "deps.lock").write_text(f"lib==1 {tmp_path.name}\n")
    (service / "deps" / "lib.py").write_text("VALUE = 1\n" * 1000)
    (service / "deps" / "link").symlink_to("lib.py")
    (home / ".tool-cache" / "blob").write_bytes(bytes(range(256)) * 64)
    return service, home, scratch


def fresh(tmp_path, name):
    service, home = tmp_path / name / "svc", tmp_path / name / "home"
    service.mkdir(parents=True)
    home.mkdir()
    return service, home


def test_key_depends_on_manifests_and_runtime(dirs):
    """The same manifests give the same key; a changed manifest a different one."""
    service, _, _ = dirs
    first = cache.compute_key("svc", SPEC, service)
    assert cache.compute_key("svc", SPEC, service).value == first.value
    assert first.manifests == {"deps.lock": first.manifests["deps.lock"]}
    assert {"os", "arch", "python"} <= set(first.runtime)
    (service / "deps.lock").write_text("lib==2\n")
    assert cache.compute_key("svc", SPEC, service).value != first.value


def test_save_then_restore_elsewhere(client_settings, dirs, tmp_path):
    """A saved cache restores into another checkout and home, symlinks and all."""
    service, home, scratch = dirs
    store = services.dependency_cache()
    key = cache.compute_key("svc-roundtrip", SPEC, service)
    size = store.save(key, SPEC.paths, service, home, scratch)
    assert size > 0
    other, other_home = fresh(tmp_path, "other")
    hit, reason, restored = store.restore(key, SPEC.paths, other, other_home, scratch)
    assert (hit, reason, restored) == (True, None, size)
    assert (other / "deps" / "lib.py").read_text() == (service / "deps" / "lib.py").read_text()
    assert (other / "deps" / "link").is_symlink()
    assert (other_home / ".tool-cache" / "blob").read_bytes() == bytes(range(256)) * 64
    (entry,) = store.entries("svc-roundtrip")
    assert entry["key"] == key.value and entry["size"] == size
    assert entry["manifests"] == key.manifests
    assert entry["last_used"] >= entry["created"]
    assert list(scratch.iterdir()) == []  # no archive left behind


def test_absent_key_is_a_miss(client_settings, dirs):
    """A key never saved is a miss with reason absent."""
    service, home, scratch = dirs
    key = cache.compute_key("svc-absent", SPEC, service)
    assert services.dependency_cache().restore(key, SPEC.paths, service, home, scratch) == (
        False,
        "absent",
        0,
    )


def test_concurrent_saves_of_one_key_leave_one_whole_archive(client_settings, dirs, tmp_path):
    """Two saves of one key at once, with different contents: the archive restores whole,
    and is entirely one of the two."""
    service, home, scratch = dirs
    key = cache.compute_key("svc-race", SPEC, service)
    variants = []
    for name in ("a", "b"):
        svc, h = fresh(tmp_path, name)
        (svc / "deps").mkdir()
        (svc / "deps" / "lib.py").write_text(f"# variant {name}\n" + "x = 1\n" * 200_000)
        (svc / "deps" / "mark").write_text(name)
        s = tmp_path / name / "scratch"
        s.mkdir()
        variants.append((svc, h, s))
    barrier = threading.Barrier(2)

    def save(svc, h, s):
        barrier.wait()
        services.dependency_cache().save(key, SPEC.paths, svc, h, s)

    threads = [threading.Thread(target=save, args=v) for v in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target, target_home = fresh(tmp_path, "target")
    hit, _, _ = services.dependency_cache().restore(key, SPEC.paths, target, target_home, scratch)
    assert hit
    mark = (target / "deps" / "mark").read_text()
    assert mark in ("a", "b")
    assert (target / "deps" / "lib.py").read_text().startswith(f"# variant {mark}\n")
    assert len(services.dependency_cache().entries("svc-race")) == 1


def test_truncated_archive_is_a_miss(client_settings, dirs, tmp_path):
    """An archive cut short in S3 (its checksum kept) is a miss, not an error."""
    service, home, scratch = dirs
    store = services.dependency_cache()
    key = cache.compute_key("svc-truncated", SPEC, service)
    store.save(key, SPEC.paths, service, home, scratch)
    objects = services.objects()
    whole = objects.client.get_object(Bucket=objects.bucket, Key=key.archive)
    data, metadata = whole["Body"].read(), whole["Metadata"]
    objects.client.put_object(Bucket=objects.bucket, Key=key.archive, Body=data[: len(data) // 2],
                              Metadata=metadata)  # fmt: skip
    target, target_home = fresh(tmp_path, "target")
    assert store.restore(key, SPEC.paths, target, target_home, scratch) == (False, "corrupt", 0)


def test_retention_removes_only_entries_unused_past_the_limit(client_settings, dirs):
    """unused_since(30) lists entries last used 31 days ago, not those used 29 days ago."""
    service, home, scratch = dirs
    store = services.dependency_cache()
    ages = {"svc-old": 31, "svc-recent": 29}
    for name, days in ages.items():
        key = cache.compute_key(name, SPEC, service)
        store.save(key, SPEC.paths, service, home, scratch)
        entry = services.objects().get_json(key.entry)
        entry["last_used"] = (datetime.now(UTC) - timedelta(days=days)).isoformat()
        services.objects().put_json(key.entry, entry)
    expired = {e["service"] for e in store.unused_since(30)} & set(ages)
    assert expired == {"svc-old"}
    for entry in store.unused_since(30):
        if entry["service"] in ages:
            store.remove(entry)
    assert store.entries("svc-old") == [] and len(store.entries("svc-recent")) == 1
