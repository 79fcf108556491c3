"""faasci.git on real repositories: validation, resolving (with snapshots), checkout."""

import hashlib
import os
import subprocess
from pathlib import Path

import git_traps
import pytest
from conftest import commit_all, git
from git_traps import TRAP_FILES

from faasci import git as fgit
from faasci.errors import Unprocessable, UserError

SHA = "0123456789abcdef0123456789abcdef01234567"
PIPELINE = "service: api\nstages:\n  unit:\n    run: [pytest]\n"


@pytest.fixture
def store(tmp_path) -> tuple[Path, Path]:
    """(snapshot store, scratch directory) as faasci.trigger passes them."""
    state = tmp_path / "state"
    scratch = tmp_path / "scratch"
    state.mkdir()
    scratch.mkdir()
    return state / "snapshots.git", scratch


@pytest.fixture(autouse=True)
def _no_parent_repository(tmp_path, monkeypatch):
    """Git never looks above tmp_path for a repository, wherever tmp_path lives."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


def resolve(repo, ref, store):
    snapshots, scratch = store
    return fgit.resolve(str(repo), ref, snapshots, scratch)


def repo_state(repo: Path) -> dict[str, str]:
    """What a snapshot must leave alone: status, refs, HEAD and the index entries."""
    return {
        "status": git(repo, "status", "--porcelain", "--untracked-files=all"),
        "refs": git(repo, "for-each-ref"),
        "head": git(repo, "rev-parse", "HEAD"),
        "symbolic_head": git(repo, "symbolic-ref", "HEAD"),
        "index": git(repo, "ls-files", "--stage"),
        "stash": git(repo, "stash", "list"),
    }


def git_dir_files(repo: Path) -> dict[str, bytes]:
    """Every file under the repository's .git, with its content (objects included)."""
    return {str(p.relative_to(repo)): p.read_bytes()
            for p in sorted((repo / ".git").rglob("*")) if p.is_file()}  # fmt: skip


def tree_files(repo: Path, commit: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", commit).splitlines())


# validate_ref / validate_repo


@pytest.mark.parametrize(
    "ref",
    [
        "--upload-pack=touch /tmp/x",
        "--upload-pack=touch${IFS}/tmp/x",
        "a..b",
        "../x",
        "-x",
        "x@{1}",
        "@{-1}",
        "",
        "/etc/passwd",
        "main.lock",
        "feature/",
        "with space",
        "semi;colon",
        "a" * 201,
    ],
)
def test_validate_ref_refuses_options_ranges_and_escapes(ref):
    """Refs that git could read as an option, a range, a reflog entry or a path are refused."""
    with pytest.raises(UserError) as caught:
        fgit.validate_ref(ref)
    assert caught.value.status == 400
    assert caught.value.field == "ref"


@pytest.mark.parametrize("ref", [None, 42, ["main"], b"main"])
def test_validate_ref_refuses_non_strings(ref):
    """A ref that is not a string is a 400 naming `ref`, not a TypeError."""
    with pytest.raises(UserError) as caught:
        fgit.validate_ref(ref)
    assert caught.value.field == "ref"


@pytest.mark.parametrize(
    "ref", ["main", "feature/x", "v1.2.3", SHA, SHA[:7], "release-2024_01", "refs/heads/main"]
)
def test_validate_ref_accepts_branches_tags_and_shas(ref):
    """Ordinary branch, tag and commit names come back unchanged."""
    assert fgit.validate_ref(ref) == ref


@pytest.mark.parametrize(
    "repo",
    [
        "repo",
        "./repo",
        "../repo",
        "~/repo",
        "-x",
        "--upload-pack=touch /tmp/x",
        "-oProxyCommand=touch /tmp/x",
        "ext::sh -c touch% /tmp/x",
        "",
        "   ",
        "/tmp/a\nb",
        "/tmp/a\0b",
    ],
)
def test_validate_repo_refuses_relative_paths_and_options(repo):
    """Relative paths, option-like strings and other transports are a 400 naming `repo`."""
    with pytest.raises(UserError) as caught:
        fgit.validate_repo(repo)
    assert caught.value.status == 400
    assert caught.value.field == "repo"


@pytest.mark.parametrize("repo", [None, 7, ["/tmp/x"]])
def test_validate_repo_refuses_non_strings(repo):
    """A repo that is not a string is a 400 naming `repo`."""
    with pytest.raises(UserError) as caught:
        fgit.validate_repo(repo)
    assert caught.value.field == "repo"


@pytest.mark.parametrize(
    "repo",
    [
        "ssh://-oProxyCommand=touch${IFS}x/repo.git",
        "ssh://git@-oProxyCommand=x/repo.git",
        "git@-oProxyCommand=x:org/repo.git",
    ],
)
def test_validate_repo_refuses_option_like_hosts_in_urls(repo):
    """A URL whose host or user part starts with `-` (CVE-2017-1000117) is refused."""
    with pytest.raises(UserError) as caught:
        fgit.validate_repo(repo)
    assert caught.value.field == "repo"


@pytest.mark.parametrize(
    "repo",
    [
        "https://github.com/org/repo.git",
        "http://git.local/repo",
        "ssh://git@github.com/org/repo.git",
        "git://git.local/repo.git",
        "git@github.com:org/repo.git",
        "file:///srv/git/repo.git",
        "/srv/git/repo",
    ],
)
def test_validate_repo_accepts_urls_and_absolute_paths(repo):
    """https, ssh, git, scp-like and file URLs and absolute paths are accepted unchanged."""
    assert fgit.validate_repo(repo) == repo


def test_validate_repo_normalises_absolute_paths():
    """An absolute path comes back normalised."""
    assert fgit.validate_repo("/srv/git/../git/./repo/") == "/srv/git/repo"


def test_resolve_refuses_an_option_ref_before_running_git(tmp_path, make_repo, store):
    """An `--upload-pack` ref is refused and its command never runs."""
    repo = make_repo({"README.md": "x\n"})
    marker = tmp_path / "pwned"
    with pytest.raises(UserError) as caught:
        resolve(repo, f"--upload-pack=touch {marker}", store)
    assert caught.value.field == "ref"
    with pytest.raises(UserError):
        resolve(f"file://{repo}", f"--upload-pack=touch {marker}", store)
    assert not marker.exists()
    assert not (store[1] / "resolve.git").exists()


# resolve


def test_resolve_a_committed_repository(make_repo, store):
    """A clean local repository resolves to HEAD on its branch, without a snapshot."""
    repo = make_repo({".faasci.yml": PIPELINE, "pyproject.toml": "", "src/app.py": ""}, "shop")
    resolved = resolve(repo, None, store)
    assert resolved.snapshot is False
    assert resolved.commit == git(repo, "rev-parse", "HEAD")
    assert resolved.ref == "main"
    assert resolved.path == ""
    # Stages check out from the repository's own store, never from the repository.
    assert resolved.source == str(fgit.repository_store(store[0], str(repo)))
    assert git(Path(resolved.source), "rev-parse", "refs/heads/main") == resolved.commit
    assert resolved.pipeline_text.strip() == PIPELINE.strip()
    assert resolved.files == {".faasci.yml", "pyproject.toml", "src"}
    assert resolved.name == "shop"
    assert git(Path(resolved.source), "for-each-ref", "refs/snapshots/") == ""  # no snapshot


def test_resolve_a_repository_without_a_pipeline_file(make_repo, store):
    """Without .faasci.yml the pipeline text is None and the root's files are listed."""
    repo = make_repo({"package.json": "{}", "index.js": ""})
    resolved = resolve(repo, None, store)
    assert resolved.pipeline_text is None
    assert resolved.files == {"package.json", "index.js"}


def test_resolve_a_service_folder_inside_a_repository(make_repo, store):
    """A folder inside a repo resolves to the repo with `path` the folder and its own files."""
    api_pipeline = "service: api\nstages:\n  lint:\n    run: [npm run lint]\n"
    repo = make_repo(
        {
            ".faasci.yml": "service: root\nstages: {unit: {run: [make]}}\n",
            "services/api/.faasci.yml": api_pipeline,
            "services/api/package.json": "{}",
            "services/web/index.html": "",
        }
    )
    resolved = resolve(repo / "services" / "api", None, store)
    assert resolved.path == "services/api"
    assert resolved.pipeline_text.strip() == api_pipeline.strip()
    assert resolved.files == {".faasci.yml", "package.json"}
    assert resolved.name == "api"
    assert resolved.commit == git(repo, "rev-parse", "HEAD")
    assert resolved.snapshot is False
    assert resolved.source == str(fgit.repository_store(store[0], str(repo)))


def test_resolve_a_dirty_working_tree_makes_a_snapshot(make_repo, store):
    """Uncommitted and untracked work is snapshotted; the user's repo is left untouched."""
    repo = make_repo(
        {
            ".gitignore": "*.log\n",
            "app.py": "v = 1\n",
            "old.py": "gone soon\n",
            "staged.py": "s = 1\n",
        }
    )
    head = git(repo, "rev-parse", "HEAD")
    (repo / "app.py").write_text("v = 2\n")  # modified, unstaged
    (repo / "new.py").write_text("n = 1\n")  # untracked
    (repo / "pkg").mkdir()
    (repo / "pkg" / "deep.py").write_text("d = 1\n")  # untracked, in a new folder
    (repo / "debug.log").write_text("ignored\n")  # ignored
    (repo / "old.py").unlink()  # deleted
    (repo / "staged.py").write_text("s = 2\n")
    git(repo, "add", "staged.py")  # staged
    before, files_before = repo_state(repo), git_dir_files(repo)

    resolved = resolve(repo, None, store)

    assert repo_state(repo) == before
    assert git_dir_files(repo) == files_before  # not one object written into the repository
    assert before["status"]  # the tree really was dirty
    assert resolved.snapshot is True
    assert resolved.commit != head
    assert resolved.ref == "main"
    snapshots = Path(resolved.source)
    assert snapshots == fgit.repository_store(store[0], str(repo))
    assert git(snapshots, "rev-parse", f"{resolved.commit}^") == head
    assert tree_files(snapshots, resolved.commit) == {
        ".gitignore",
        "app.py",
        "new.py",
        "pkg/deep.py",
        "staged.py",
    }
    assert git(snapshots, "show", f"{resolved.commit}:app.py") == "v = 2"
    assert git(snapshots, "show", f"{resolved.commit}:staged.py") == "s = 2"
    assert git(snapshots, "show", f"{resolved.commit}:pkg/deep.py") == "d = 1"
    assert resolved.files == {".gitignore", "app.py", "new.py", "pkg", "staged.py"}
    # Nothing but the repository's store (and its lock file) under the snapshots folder.
    assert sorted(p.name for p in store[0].parent.iterdir()) == ["snapshots.git"]
    assert sorted(p.name for p in store[0].iterdir()) == [snapshots.name, f"{snapshots.name}.lock"]


def test_snapshot_of_a_folder_reads_the_uncommitted_pipeline_file(make_repo, store):
    """A dirty service folder's pipeline text comes from the snapshot, not from HEAD."""
    repo = make_repo({"svc/.faasci.yml": PIPELINE, "svc/setup.py": "", "other/x": ""})
    edited = PIPELINE.replace("pytest", "pytest -x")
    (repo / "svc" / ".faasci.yml").write_text(edited)
    (repo / "svc" / "extra.txt").write_text("new\n")
    resolved = resolve(repo / "svc", None, store)
    assert resolved.snapshot is True
    assert resolved.path == "svc"
    assert resolved.pipeline_text.strip() == edited.strip()
    assert resolved.files == {".faasci.yml", "setup.py", "extra.txt"}
    assert resolved.name == "svc"


def test_two_snapshots_of_different_trees_differ_and_both_stay_available(make_repo, store):
    """A second snapshot after further edits is a new commit; the first is still stored."""
    repo = make_repo({"a.txt": "1\n"})
    (repo / "a.txt").write_text("2\n")
    first = resolve(repo, None, store)
    (repo / "a.txt").write_text("3\n")
    second = resolve(repo, None, store)
    assert first.commit != second.commit
    assert first.source == second.source
    assert git(Path(first.source), "show", f"{first.commit}:a.txt") == "2"
    assert git(Path(first.source), "show", f"{second.commit}:a.txt") == "3"


def test_an_untracked_file_alone_makes_a_snapshot(make_repo, store):
    """A tree whose only change is a new untracked file is snapshotted with that file."""
    repo = make_repo({"a.txt": "1\n"})
    (repo / "sub").mkdir()
    (repo / "sub" / "new.txt").write_text("new\n")
    before = repo_state(repo)
    resolved = resolve(repo, None, store)
    assert repo_state(repo) == before
    assert resolved.snapshot is True
    assert tree_files(Path(resolved.source), resolved.commit) == {"a.txt", "sub/new.txt"}


def test_resolve_only_ignored_changes_is_not_a_snapshot(make_repo, store):
    """A tree whose only changes are ignored files counts as clean."""
    repo = make_repo({".gitignore": "build/\n", "a.txt": "1\n"})
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_text("x")
    resolved = resolve(repo, None, store)
    assert resolved.snapshot is False
    assert resolved.commit == git(repo, "rev-parse", "HEAD")


def test_resolve_an_explicit_tag_and_branch(make_repo, store, tmp_path):
    """A tag (annotated) and a branch resolve to their commits, ignoring the working tree."""
    repo = make_repo({".faasci.yml": PIPELINE, "version.txt": "1\n"})
    tagged = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "-a", "v1.2.3", "-m", "release")
    git(repo, "checkout", "--quiet", "-b", "feature/x")
    (repo / "version.txt").write_text("feature\n")
    feature = commit_all(repo, "feature work")
    git(repo, "checkout", "--quiet", "main")
    (repo / "version.txt").write_text("2\n")
    main = commit_all(repo, "main work")
    (repo / "version.txt").write_text("dirty\n")  # must not matter with an explicit ref

    snapshots = store[0]
    results = {}
    for ref in ("v1.2.3", "feature/x", "main", tagged[:10]):
        scratch = tmp_path / f"scratch-{len(results)}"
        scratch.mkdir()
        results[ref] = fgit.resolve(str(repo), ref, snapshots, scratch)

    assert results["v1.2.3"].commit == tagged  # the commit, not the tag object
    assert results["feature/x"].commit == feature
    assert results["main"].commit == main
    assert results[tagged[:10]].commit == tagged
    for ref, resolved in results.items():
        assert resolved.ref == ref
        assert resolved.snapshot is False
        assert resolved.source == str(fgit.repository_store(snapshots, str(repo)))
        assert resolved.pipeline_text.strip() == PIPELINE.strip()


def test_resolve_a_missing_path_names_repo(tmp_path, store):
    """A path that does not exist is a 422 naming `repo`."""
    with pytest.raises(Unprocessable) as caught:
        resolve(tmp_path / "nowhere", None, store)
    assert caught.value.status == 422
    assert caught.value.field == "repo"


def test_resolve_a_folder_outside_any_repository_names_repo(tmp_path, store):
    """A folder that is not in a git repository is a 422 naming `repo`."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file.txt").write_text("x")
    with pytest.raises(Unprocessable) as caught:
        resolve(plain, None, store)
    assert caught.value.field == "repo"
    assert "not inside a git repository" in caught.value.message


def test_resolve_a_repository_without_commits_names_repo(tmp_path, store):
    """A freshly initialised repository with no commit is a 422 naming `repo`."""
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "--quiet")
    (empty / "a.txt").write_text("x")
    with pytest.raises(Unprocessable) as caught:
        resolve(empty, None, store)
    assert caught.value.field == "repo"


def test_resolve_an_unknown_ref_names_ref(make_repo, store):
    """A ref the repository does not have is a 422 naming `ref`."""
    repo = make_repo({"a.txt": "x"})
    with pytest.raises(Unprocessable) as caught:
        resolve(repo, "no-such-branch", store)
    assert caught.value.status == 422
    assert caught.value.field == "ref"
    assert "no-such-branch" in caught.value.message


def test_resolve_an_unreachable_url_names_repo(tmp_path, store):
    """A file:// URL to nothing is a 422 naming `repo`."""
    with pytest.raises(Unprocessable) as caught:
        resolve(f"file://{tmp_path}/missing.git", None, store)
    assert caught.value.field == "repo"


def test_resolve_a_relative_path_is_a_400(store):
    """A relative path is refused as bad input before any lookup."""
    with pytest.raises(UserError) as caught:
        resolve("relative/repo", None, store)
    assert caught.value.status == 400
    assert caught.value.field == "repo"


def test_resolve_a_file_url(make_repo, store, tmp_path):
    """A file:// URL resolves its HEAD (never a snapshot) and stages clone from the URL."""
    repo = make_repo({".faasci.yml": PIPELINE, "requirements.txt": ""}, "billing")
    head = git(repo, "rev-parse", "HEAD")
    (repo / "requirements.txt").write_text("dirty\n")  # a URL never sees the working tree
    url = f"file://{repo}"
    resolved = resolve(url, None, store)
    assert resolved.commit == head
    assert resolved.ref == "HEAD"
    assert resolved.snapshot is False
    assert resolved.source == url
    assert resolved.path == ""
    assert resolved.pipeline_text.strip() == PIPELINE.strip()
    assert resolved.files == {".faasci.yml", "requirements.txt"}
    assert resolved.name == "billing"
    dest = tmp_path / "work"
    fgit.checkout(resolved.source, resolved.commit, dest)
    assert (dest / "requirements.txt").read_text() == ""


def test_resolve_a_file_url_with_a_branch(make_repo, store):
    """A file:// URL with an explicit branch resolves that branch's commit."""
    repo = make_repo({"a.txt": "1"})
    git(repo, "checkout", "--quiet", "-b", "dev")
    dev = commit_all(repo, "dev work")
    git(repo, "checkout", "--quiet", "main")
    resolved = resolve(f"file://{repo}/", "dev", store)
    assert resolved.commit == dev
    assert resolved.ref == "dev"
    assert resolved.name == repo.name


# reading files of the commit


def test_read_gives_a_file_of_the_commit_exactly(make_repo, store):
    """`read` gives a file's text at the resolved commit, byte for byte, from the service
    folder; None for a missing name and for a folder."""
    repo = make_repo({"svc/pyproject.toml": "[project]\nname = 'x'\n\n", "svc/src/a.py": "",
                      "pyproject.toml": "root"})  # fmt: skip
    resolved = resolve(repo / "svc", None, store)
    assert resolved.read("pyproject.toml") == "[project]\nname = 'x'\n\n"
    assert resolved.read("missing.txt") is None
    assert resolved.read("src") is None


def test_read_sees_the_snapshot_and_a_ref_not_the_working_tree(make_repo, store, tmp_path):
    """A dirty tree's snapshot is read with its uncommitted work; an explicit ref reads that
    commit's version whatever the working tree holds."""
    repo = make_repo({"requirements.txt": "flask\n"})
    first = git(repo, "rev-parse", "HEAD")
    (repo / "requirements.txt").write_text("django\n")
    assert resolve(repo, None, store).read("requirements.txt") == "django\n"
    scratch = tmp_path / "scratch-ref"
    scratch.mkdir()
    pinned = fgit.resolve(str(repo), first, store[0], scratch)
    assert pinned.read("requirements.txt") == "flask\n"


def test_read_of_a_url_reads_the_resolve_clone(make_repo, store):
    """A URL's files are read from the clone the resolve made (while its scratch exists)."""
    repo = make_repo({"package.json": '{"scripts": {}}'})
    resolved = resolve(f"file://{repo}", None, store)
    assert resolved.source == f"file://{repo}"
    assert resolved.read("package.json") == '{"scripts": {}}'


# checkout


def test_checkout_produces_a_work_tree_at_the_commit(make_repo, tmp_path):
    """checkout gives a clean detached work tree of exactly that commit."""
    repo = make_repo({"a.txt": "first\n", "dir/b.txt": "b\n"})
    first = git(repo, "rev-parse", "HEAD")
    (repo / "a.txt").write_text("second\n")
    (repo / "c.txt").write_text("c\n")
    commit_all(repo, "second")
    dest = tmp_path / "checkout"
    fgit.checkout(str(repo), first, dest)
    assert git(dest, "rev-parse", "HEAD") == first
    assert (dest / "a.txt").read_text() == "first\n"
    assert (dest / "dir" / "b.txt").read_text() == "b\n"
    assert not (dest / "c.txt").exists()
    assert git(dest, "status", "--porcelain") == ""


def test_checkout_of_a_snapshot_from_the_snapshot_store(make_repo, store, tmp_path):
    """A snapshot commit checks out from the snapshot store with the uncommitted work."""
    repo = make_repo({".gitignore": "*.log\n", "a.txt": "committed\n"})
    (repo / "a.txt").write_text("uncommitted\n")
    (repo / "new.txt").write_text("untracked\n")
    (repo / "x.log").write_text("ignored\n")
    resolved = resolve(repo, None, store)
    dest = tmp_path / "checkout"
    fgit.checkout(resolved.source, resolved.commit, dest)
    assert git(dest, "rev-parse", "HEAD") == resolved.commit
    assert (dest / "a.txt").read_text() == "uncommitted\n"
    assert (dest / "new.txt").read_text() == "untracked\n"
    assert not (dest / "x.log").exists()


def test_a_checkout_from_the_store_is_what_gits_own_clone_makes(make_repo, store, tmp_path):
    """From a store, checkout writes the clone itself: the same refs (branches as origin's,
    tags, packed or loose; none of the store's own), HEAD, config and work tree as `git
    clone` of the store followed by the same checkout."""
    repo = make_repo({"a.txt": "one\n"})
    git(repo, "tag", "light")
    git(repo, "tag", "-a", "-m", "annotated", "v1")
    git(repo, "checkout", "--quiet", "-b", "feature/x")
    (repo / "a.txt").write_text("two\n")
    commit_all(repo, "two")
    git(repo, "checkout", "--quiet", "main")
    (repo / "dirty.txt").write_text("uncommitted\n")  # a snapshot: refs/snapshots in the store
    resolved = resolve(repo, None, store)
    source = resolved.source
    git(Path(source), "pack-refs", "--all")  # some refs packed, some loose
    git(Path(source), "update-ref", "refs/heads/later", resolved.commit)

    def seen(dest: Path) -> dict[str, str]:
        return {"refs": git(dest, "for-each-ref", "--format=%(refname) %(objectname) %(symref)"),
                "head": git(dest, "rev-parse", "HEAD"),
                "status": git(dest, "status", "--porcelain"),
                "config": git(dest, "config", "--local", "--list"),
                "files": sorted(str(f.relative_to(dest)) for f in dest.rglob("*")
                                if ".git" not in f.parts),
                "describe": git(dest, "describe", "--tags", "--always", "--dirty")}  # fmt: skip

    # The store's HEAD names a branch the repository lacks (git init's), then one it has.
    for default in ("refs/heads/master", "refs/heads/main"):
        git(Path(source), "symbolic-ref", "HEAD", default)
        mine, theirs = tmp_path / f"mine-{default[11:]}", tmp_path / f"theirs-{default[11:]}"
        fgit.checkout(source, resolved.commit, mine)
        git(tmp_path, "clone", "--quiet", "--template=", "--no-checkout", "--", source, str(theirs))
        git(theirs, "checkout", "--quiet", "--detach", resolved.commit)
        assert seen(mine) == seen(theirs)
    assert "refs/remotes/origin/HEAD" in seen(mine)["refs"]
    assert "refs/remotes/origin/feature/x" in seen(mine)["refs"]
    assert "refs/snapshots" not in seen(mine)["refs"]
    assert (mine / "dirty.txt").read_text() == "uncommitted\n"
    assert (mine / ".git" / "objects").stat().st_dev == Path(source).stat().st_dev


def test_checkout_of_an_unknown_commit_is_a_git_error(make_repo, tmp_path):
    """A commit the source does not have raises GitError naming the commit."""
    repo = make_repo({"a.txt": "x"})
    with pytest.raises(fgit.GitError) as caught:
        fgit.checkout(str(repo), SHA, tmp_path / "dest")
    assert SHA[:12] in str(caught.value)


# A repository whose own git configuration runs commands (tests/git_traps.py): resolving
# it runs none of them and writes nothing into it.


@pytest.fixture
def arm(tmp_path):
    """arm(repo) -> the markers folder (see git_traps.arm)."""
    return lambda repo: git_traps.arm(repo, tmp_path / "traps")


def test_the_trap_is_real(arm, make_repo):
    """Plain git in an armed repository does run its commands: what the tests below show
    is not for want of a working trap."""
    repo = make_repo(TRAP_FILES, "trapped")
    markers = arm(repo)
    (repo / "a.txt").write_text("edited\n")
    (repo / "data.dat").write_text("edited\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}  # fmt: skip

    def plain_git(*args):
        subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, check=False)

    plain_git("status")
    plain_git("add", "--all")
    (repo / ".gitattributes").write_text("*.txt filter=trap diff=trap\n")  # no process filter
    plain_git("add", "--all")
    plain_git("commit", "-q", "-m", "x")
    touched = {p.name for p in markers.iterdir()}
    expected = {"fsmonitor", "filter-clean", "filter-process", "hook-pre-commit", "gpg"}
    assert expected <= touched, touched


def gitdir_digests(repo: Path) -> dict[str, str]:
    """Every file under .git (index, objects, refs, logs, config...) by its sha256, and
    every folder: a byte-for-byte picture of the repository's own state."""
    found = {}
    for p in sorted((repo / ".git").rglob("*")):
        rel = str(p.relative_to(repo))
        found[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return found


def assert_untouched(repo: Path, markers: Path, before: dict[str, str]) -> None:
    assert sorted(p.name for p in markers.iterdir()) == []
    assert gitdir_digests(repo) == before


def test_resolving_a_clean_armed_repository_runs_nothing_and_writes_nothing(arm, make_repo, store):
    """A clean working tree: HEAD, read without running a command of the repository's and
    without writing into its .git (not even a stat refresh of its index)."""
    repo = make_repo(TRAP_FILES, "trapped")
    head = git(repo, "rev-parse", "HEAD")
    markers = arm(repo)
    before = gitdir_digests(repo)
    resolved = resolve(repo, None, store)
    assert_untouched(repo, markers, before)
    assert resolved.snapshot is False and resolved.commit == head and resolved.ref == "main"
    assert resolved.read("a.txt") == "committed text\n"


def test_resolving_a_dirty_armed_repository_runs_nothing_and_writes_nothing(
    arm, make_repo, store, tmp_path
):
    """Committed and uncommitted changes (modified, staged, untracked, deleted, ignored,
    excluded): the snapshot holds the working tree's exact bytes (no filter ran over
    them), and the repository is byte for byte as it was."""
    repo = make_repo(TRAP_FILES, "trapped")
    (repo / "a.txt").write_text("second commit\n")
    second = commit_all(repo, "second")
    (repo / "staged.py").write_text("s = 1\n")
    git(repo, "add", "staged.py")
    markers = arm(repo)
    (repo / "a.txt").write_text("uncommitted text\n")
    (repo / "data.dat").write_text("d = 2\n")
    (repo / "new.txt").write_text("untracked\n")
    (repo / "debug.log").write_text("ignored\n")
    (repo / "private-notes.md").write_text("excluded by .git/info/exclude\n")
    (repo / "app.py").unlink()
    before = gitdir_digests(repo)

    resolved = resolve(repo, None, store)
    again = resolve(repo, None, store)  # with the store's index already there

    assert_untouched(repo, markers, before)
    snapshots = Path(resolved.source)
    assert resolved.snapshot is True and again.snapshot is True
    assert (
        git(
            snapshots, "rev-parse", f"{again.commit}^{{tree}}", f"{resolved.commit}^{{tree}}"
        ).split()
        == [git(snapshots, "rev-parse", f"{resolved.commit}^{{tree}}")] * 2
    )
    assert git(snapshots, "rev-parse", f"{resolved.commit}^") == second
    expected = {".gitattributes", ".gitignore", "a.txt", "data.dat", "new.txt", "staged.py"}
    assert tree_files(snapshots, resolved.commit) == expected
    assert resolved.read("a.txt") == "uncommitted text\n"
    assert resolved.read("data.dat") == "d = 2\n"
    assert resolved.read("new.txt") == "untracked\n"
    assert resolved.read("staged.py") == "s = 1\n"
    # Stages check the snapshot out from the store: no trap there either.
    dest = tmp_path / "checkout"
    fgit.checkout(resolved.source, resolved.commit, dest)
    assert (dest / "a.txt").read_text() == "uncommitted text\n"
    assert_untouched(repo, markers, before)


def test_resolving_a_ref_of_an_armed_repository_runs_nothing(arm, make_repo, store, tmp_path):
    """An explicit branch, tag, HEAD or commit of a local repository: fetched into its
    store, nothing run, nothing written."""
    repo = make_repo(TRAP_FILES, "trapped")
    git(repo, "tag", "-a", "v1", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    markers = arm(repo)
    (repo / "a.txt").write_text("dirty, and not what a ref means\n")
    before = gitdir_digests(repo)
    for n, ref in enumerate(("main", "v1", "HEAD", head[:12])):
        scratch = tmp_path / f"scratch-{n}"
        scratch.mkdir()
        resolved = fgit.resolve(str(repo), ref, store[0], scratch)
        assert resolved.commit == head and resolved.ref == ref and not resolved.snapshot
    assert_untouched(repo, markers, before)


def test_a_worktree_of_an_armed_repository_is_read_safely(arm, make_repo, store, tmp_path):
    """A linked worktree (a `.git` file) resolves to its own branch and working tree, its
    repository's traps untouched."""
    repo = make_repo(TRAP_FILES, "trapped")
    worktree = tmp_path / "wt"
    git(repo, "worktree", "add", "--quiet", "-b", "side", str(worktree))
    markers = arm(worktree)
    (worktree / "a.txt").write_text("in the worktree\n")
    before = gitdir_digests(repo)
    resolved = resolve(worktree, None, store)
    assert_untouched(repo, markers, before)
    assert resolved.ref == "side" and resolved.snapshot is True
    assert resolved.read("a.txt") == "in the worktree\n"
    assert resolved.source == str(fgit.repository_store(store[0], str(worktree)))


def test_repositories_have_stores_of_their_own(make_repo, store):
    """Two repositories never share a store: a stage of one cannot read the other's objects."""
    one = make_repo({"a.txt": "one\n"})
    two = make_repo({"b.txt": "two\n"})
    first, second = resolve(one, None, store), resolve(two, None, store)
    assert first.source != second.source
    missing = subprocess.run(["git", "cat-file", "-e", second.commit], cwd=first.source,
                             capture_output=True)  # fmt: skip
    assert missing.returncode != 0


def test_a_path_inside_the_git_folder_is_not_a_working_tree(make_repo, store):
    repo = make_repo({"a.txt": "x"})
    with pytest.raises(Unprocessable) as caught:
        resolve(repo / ".git" / "refs", None, store)
    assert caught.value.field == "repo" and ".git" in caught.value.message


def test_git_runs_with_commands_switched_off_over_the_callers_own_config(monkeypatch):
    """faas-ci's git gets fsmonitor, hooks and signing off through GIT_CONFIG_*, after any
    such settings the environment brings (the containers' safe.directory)."""
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "safe.directory")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "*")
    env = fgit.git_env()
    count = int(env["GIT_CONFIG_COUNT"])
    pairs = {env[f"GIT_CONFIG_KEY_{n}"]: env[f"GIT_CONFIG_VALUE_{n}"] for n in range(count)}
    assert pairs["safe.directory"] == "*"
    assert pairs["core.fsmonitor"] == "false" and pairs["core.hooksPath"] == "/dev/null"
    assert pairs["commit.gpgSign"] == "false"
    assert fgit.git("config", "--get", "core.fsmonitor") == "false"


def test_a_ref_names_the_repositorys_refs_never_the_stores_own(make_repo, store, tmp_path):
    """Refs the store keeps for itself (a snapshot of another state, HEAD's copy) are not
    what a ref of the repository can name."""
    repo = make_repo({"a.txt": "1\n"})
    (repo / "a.txt").write_text("2\n")
    snap = resolve(repo, None, store)
    assert snap.snapshot
    for n, ref in enumerate((f"snapshots/{snap.commit}", f"refs/snapshots/{snap.commit}",
                             "faasci/head", f"bases/{snap.commit}")):  # fmt: skip
        scratch = tmp_path / f"s{n}"
        scratch.mkdir()
        with pytest.raises(Unprocessable) as caught:
            fgit.resolve(str(repo), ref, store[0], scratch)
        assert caught.value.field == "ref"
