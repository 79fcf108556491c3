"""Two stacks' container engines on one machine keep their container locks apart."""

from faasci.local.engine import Engine


def an_image_and_a_container(engine: Engine) -> str:
    """An empty image imported, and a container created from it (never started); its id."""
    done = engine.podman("import", "/dev/stdin", "localhost/empty", input="")
    assert done.returncode == 0, done.stderr
    made = engine.podman("create", "localhost/empty", "/nothing")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_each_engine_locks_its_containers_in_its_own_folder(tmp_path):
    """A container's lock is a file in its engine's folder, not a slot of the machine's one
    /dev/shm/libpod_lock, where two engines' lock numbers collided."""
    engines = [Engine(tmp_path / name) for name in ("one", "two")]
    for engine in engines:
        engine.configure()
        an_image_and_a_container(engine)
    for engine in engines:
        locks = sorted((engine.folder / "tmp" / "locks").iterdir())
        assert [p.name for p in locks] == ["0"], locks  # each numbers its own from 0
    # Removing one engine's container leaves the other's lock where it was.
    gone = engines[0].podman("rm", "--all", "--force")
    assert gone.returncode == 0, gone.stderr
    listed = engines[1].podman("ps", "--all", "--format", "{{.ID}}")
    assert listed.stdout.strip() and (engines[1].folder / "tmp" / "locks" / "0").exists()
    for engine in engines:
        engine.stop()  # undoes the storage's mount, so tmp_path can be deleted
