"""The local stack's configuration: where its functions' scratch space goes."""

import os
import tempfile

import pytest

from faasci.local import config
from faasci.local.config import LocalConfig


@pytest.fixture
def cfg(tmp_path, monkeypatch) -> LocalConfig:
    """A local stack configuration whose home is in tmp_path."""
    monkeypatch.setenv("FAASCI_HOME", str(tmp_path / "home"))
    return LocalConfig.from_env()


def test_the_scratch_space_is_in_memory_with_the_cache_a_quarter_of_it(cfg):
    """Where /dev/shm is a writable mount, the work folders are there, and the cache layer
    in them may fill a quarter of that file system."""
    assert os.path.ismount("/dev/shm"), "this machine has no /dev/shm to test with"
    assert cfg.workdir.parent == config.MEMORY_FS and cfg.cache_dir.is_relative_to(cfg.workdir)
    fs = os.statvfs("/dev/shm")
    assert cfg.stage_env()["FAASCI_CACHE_MAX_BYTES"] == str(fs.f_frsize * fs.f_blocks // 4)


def test_without_a_memory_file_system_it_is_the_temp_folder(cfg, tmp_path, monkeypatch):
    """Where there is none, the machine's temp folder, and the cache's own default bound."""
    monkeypatch.setattr(config, "MEMORY_FS", tmp_path / "no-shm")  # not a mount point
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what gettempdir() answers
    assert cfg.workdir.parent == tmp_path
    assert "FAASCI_CACHE_MAX_BYTES" not in cfg.stage_env()
