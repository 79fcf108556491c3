"""Cache identity and keys, without services: namespaces from repository spellings, keys
from manifests, runtime, set-up and paths, manifests read from a checkout or a commit."""

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import commit_all

from faasci import cache, pipeline

SPEC = pipeline.CacheSpec(setup=["make deps"], paths=["deps", "~/.tool"],
                          manifests=["deps.lock", "sub/*.txt"])  # fmt: skip
RUNTIME = {"os": "debian-12", "arch": "x86_64", "workspace": "/w"}


@pytest.mark.parametrize("spelling", [
    "https://github.com/Owner/Name",
    "https://github.com/Owner/Name.git",
    "https://github.com/Owner/Name/",
    "HTTPS://GitHub.com/Owner/Name.git/",
    "https://user:secret@github.com/Owner/Name.git",
    "https://github.com:443/Owner/Name",
])  # fmt: skip
def test_https_spellings_share_a_namespace(spelling):
    """Case of scheme and host, credentials, default port, `.git` and `/` do not matter."""
    assert cache.namespace_of(spelling) == cache.namespace_of("https://github.com/Owner/Name")


def test_scp_form_is_the_ssh_url():
    """`git@host:owner/name` is `ssh://git@host/owner/name`."""
    expected = cache.namespace_of("ssh://git@github.com/Owner/Name")
    assert cache.namespace_of("git@github.com:Owner/Name.git") == expected
    assert cache.namespace_of("ssh://git@GitHub.com:22/Owner/Name") == expected


@pytest.mark.parametrize("other", [
    "bob@host.example:repo",  # bob's home folder, not alice's
    "ssh://bob@host.example/repo",
    "ssh://host.example/repo",  # the caller's own user name
    "https://host.example/repo?ref=other",  # a server may answer a query differently
    "https://host.example/repo#other",
])  # fmt: skip
def test_spellings_that_may_fetch_another_repository_are_other_namespaces(other):
    """Only what cannot change what git fetches is dropped: an SSH user, a query and a
    fragment stay, so a repository of one's own can never be spelt into another's cache."""
    assert cache.normalize_repo("alice@host.example:repo") == "ssh://alice@host.example/repo"
    assert cache.namespace_of(other) != cache.namespace_of("alice@host.example:repo")
    assert cache.namespace_of(other) != cache.namespace_of("https://host.example/repo")


def test_a_file_url_with_a_query_is_not_the_path(tmp_path):
    """`file:///x?y` is read by git as the folder `x?y`, not `x`."""
    (tmp_path / "repo").mkdir()
    assert cache.namespace_of(f"file://{tmp_path}/repo?x") != cache.namespace_of(
        str(tmp_path / "repo")
    )


def test_different_repositories_differ():
    """Path case, another owner, another host, another scheme: other namespaces."""
    spellings = ["https://github.com/Owner/Name", "https://github.com/owner/name",
                 "https://github.com/Other/Name", "https://gitlab.com/Owner/Name",
                 "ssh://github.com/Owner/Name"]  # fmt: skip
    assert len({cache.namespace_of(s) for s in spellings}) == len(spellings)


def test_namespace_is_readable_and_safe():
    """`<name>-<16 hex>`, the name made of safe characters."""
    ns = cache.namespace_of("https://example.com/x/My Service!.git")
    name, digest = ns.rsplit("-", 1)
    assert name == "My-Service" and len(digest) == 16 and int(digest, 16) >= 0
    assert cache.namespace_of("https://example.com/x/...").startswith("repo-")


def test_local_path_and_file_url_and_symlink_are_one_repository(tmp_path):
    """A local repository is its real path, however it is named."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "repo")
    expected = cache.namespace_of(str(tmp_path / "repo"))
    assert cache.namespace_of(str(tmp_path / "link")) == expected
    assert cache.namespace_of(f"file://{tmp_path}/repo") == expected
    assert cache.namespace_of(str(tmp_path / "repo") + "/") == expected
    assert expected.startswith("repo-")
    assert cache.namespace_of(str(tmp_path / "other")) != expected


def test_key_is_stable_and_depends_on_what_the_cache_is_made_of():
    """Same inputs, same key; manifests' contents, runtime, set-up and paths each change it;
    `prepare`, the manifests' order and the namespace's entries' order do not."""
    manifests = {"deps.lock": b"lib==1\n", "sub/a.txt": b"a\n"}
    key = cache.compute_key("ns", SPEC, manifests, RUNTIME)
    assert key == cache.compute_key("ns", SPEC, dict(reversed(manifests.items())), dict(RUNTIME))
    assert key.archive == f"cache/ns/{key.value}.tar.zst" and key.entry.endswith(".json")
    assert set(key.manifests) == {"deps.lock", "sub/a.txt"}
    with_prepare = SPEC.model_copy(update={"prepare": ["pip install -e ."]})
    assert cache.compute_key("ns", with_prepare, manifests, RUNTIME).value == key.value
    changed = [
        cache.compute_key("ns", SPEC, {**manifests, "deps.lock": b"lib==2\n"}, RUNTIME),
        cache.compute_key("ns", SPEC, {"deps.lock": b"lib==1\n"}, RUNTIME),
        cache.compute_key("ns", SPEC, manifests, {**RUNTIME, "python3": "/usr/bin/python3.12"}),
        cache.compute_key("ns", SPEC, manifests, {**RUNTIME, "workspace": "/elsewhere"}),
        cache.compute_key("ns", SPEC.model_copy(update={"setup": ["other"]}), manifests, RUNTIME),
        cache.compute_key("ns", SPEC.model_copy(update={"paths": ["deps"]}), manifests, RUNTIME),
    ]
    assert len({k.value for k in changed} | {key.value}) == len(changed) + 1


def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


FILES = {
    "svc/deps.lock": b"lib==1\r\nother==2\n",  # CRLF and all: the exact bytes count
    "svc/sub/a.txt": b"\xff\xfe not utf-8\n",
    "svc/sub/.hidden.txt": b"not matched by *\n",
    "svc/sub/deeper/b.txt": b"not matched: one level only\n",
    "svc/README.md": b"not a manifest\n",
    "other/deps.lock": b"another service's\n",
}


def test_manifests_of_a_commit_are_those_of_its_checkout(make_repo, tmp_path):
    """manifests_at_commit (no checkout) reads exactly what manifests_in_dir reads."""
    repo = make_repo({"README.md": "x\n"})
    write(repo, FILES)
    commit = commit_all(repo, "manifests")
    in_dir = cache.manifests_in_dir(SPEC, repo / "svc")
    assert in_dir == {"deps.lock": FILES["svc/deps.lock"], "sub/a.txt": FILES["svc/sub/a.txt"]}
    assert cache.manifests_at_commit(SPEC, str(repo), commit, "svc") == in_dir
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "--bare", "--quiet", str(repo), str(bare)], check=True)
    assert cache.manifests_at_commit(SPEC, str(bare), commit, "svc") == in_dir


def test_default_manifests_by_project_type(make_repo):
    """Without `manifests`, the project's type picks them, in a checkout and at a commit."""
    repo = make_repo({"pyproject.toml": "[project]\nname='x'\n", "requirements-dev.txt": "a\n",
                      "src/x/__init__.py": "", "notes.txt": "no\n"})  # fmt: skip
    spec = pipeline.CacheSpec(setup=["true"], paths=[".venv"])
    in_dir = cache.manifests_in_dir(spec, repo)
    assert set(in_dir) == {"pyproject.toml", "requirements-dev.txt"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert cache.manifests_at_commit(spec, str(repo), head) == in_dir


def fake_python(folder: Path, version: str) -> Path:
    """A `python3` on a PATH of its own that prints a version and counts its runs."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "python3"
    tool.write_text(f"#!/bin/sh\necho run >> {folder}/runs\necho {version}\n")
    tool.chmod(0o755)
    return tool


def test_stage_runtime_reads_the_stages_path_not_faasci(tmp_path):
    """The Python on the given PATH (real path and version) counts, probed once per
    interpreter file; an image replaces the host's tools; faas-ci's own Python is not used."""
    bin_dir = tmp_path / "bin"
    tool = fake_python(bin_dir, "3.99.1")
    path = f"{bin_dir}:/nonexistent"
    facts = cache.stage_runtime(path, Path("/w"))
    assert facts["python3"] == f"{tool} 3.99.1"
    assert facts["workspace"] == "/w" and {"os", "arch"} <= set(facts)
    assert "node" not in facts  # not on that PATH
    assert cache.stage_runtime(path, Path("/w")) == facts
    assert (bin_dir / "runs").read_text().count("run") == 1  # memoized
    time.sleep(0.01)
    tool.write_text(tool.read_text().replace("3.99.1", "3.99.2"))  # a new interpreter file
    os.utime(tool, None)
    assert cache.stage_runtime(path, Path("/w"))["python3"] == f"{tool} 3.99.2"
    in_image = cache.stage_runtime(path, Path("/w"), "python:3.12-slim")
    assert in_image["image"] == "python:3.12-slim" and "python3" not in in_image
    link_dir = tmp_path / "venv-bin"
    link_dir.mkdir()
    (link_dir / "python3").symlink_to(tool)  # a virtualenv's python is its interpreter
    assert cache.stage_runtime(f"{link_dir}:/nonexistent", Path("/w"))["python3"].startswith(
        f"{tool} "
    )


def test_stage_runtime_of_the_system_tools():
    """On the system's PATH: the real python3 (and node when installed) with versions."""
    facts = cache.stage_runtime("/usr/local/bin:/usr/bin:/bin", Path("/w"))
    real, version = facts["python3"].split(" ")
    assert os.path.isabs(real) and version[0].isdigit()
    if "node" in facts:
        assert facts["node"].split(" ")[1].startswith("v")
