"""Git: validating what callers name, resolving it to a commit, checking a commit out.

Every git call passes user input after `--` or as a validated value, never where git
could read it as an option (a ref like `--upload-pack=...` is refused before git runs).

A local repository is untrusted input too: its `.git/config` can name commands git would
run (core.fsmonitor, core.hooksPath, filter drivers for its .gitattributes, diff.external,
core.sshCommand, gpg.program, credential helpers, includes of any of these...). So git is
never run *in* it. Its commits are fetched (git's upload-pack, which is made to serve
untrusted repositories and runs nothing they configure) into a store of faas-ci's own per
repository (`<snapshots>/<namespace>.git`); its working tree is read with GIT_DIR set to
that store, GIT_WORK_TREE to the tree and an index of the store's, so git reads no config
but the store's and faas-ci's (fsmonitor, hooks and signing off); the top of the working
tree is found by looking for `.git` in the file system. Nothing is written into the
repository: not an object, a ref, its index (not even a stat refresh) nor a lock.
Stages check out from the store, never from the repository.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import Unprocessable, UserError

URL_RE = re.compile(r"^(https?|ssh|git|file)://[^\s]+$|^[\w.-]+@[\w.-]+:[^\s]+$")
SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
NETWORK_TIMEOUT = 120

# No prompts for credentials and no reading of the caller's git configuration hooks.
GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "/bin/true",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "faas-ci",
    "GIT_AUTHOR_EMAIL": "faasci@localhost",
    "GIT_COMMITTER_NAME": "faas-ci",
    "GIT_COMMITTER_EMAIL": "faasci@localhost",
}
# Settings that would run a command, forced off in every git faas-ci runs (over any
# config file, the caller's global one included; passed on to the git processes it starts).
SAFE_CONFIG = {
    "core.fsmonitor": "false",
    "core.hooksPath": "/dev/null",
    "core.untrackedCache": "false",
    "commit.gpgSign": "false",
    "tag.gpgSign": "false",
    "protocol.ext.allow": "never",
}


def _config_env(base: dict) -> dict:
    """GIT_CONFIG_COUNT/KEY/VALUE adding SAFE_CONFIG after whatever `base` sets already."""
    try:
        count = int(base.get("GIT_CONFIG_COUNT") or 0)
    except ValueError:
        count = 0
    env = {}
    for n, (key, value) in enumerate(SAFE_CONFIG.items(), start=count):
        env[f"GIT_CONFIG_KEY_{n}"], env[f"GIT_CONFIG_VALUE_{n}"] = key, value
    env["GIT_CONFIG_COUNT"] = str(count + len(SAFE_CONFIG))
    return env


def git_env(extra: dict | None = None) -> dict:
    """The environment of a git faas-ci runs."""
    env = {**os.environ, **GIT_ENV, **(extra or {})}
    return {**env, **_config_env(env)}


class GitError(Exception):
    """Git failed for a reason that is not the caller's input (an infrastructure error)."""


def git(
    *args: str,
    cwd: Path | str | None = None,
    env: dict | None = None,
    timeout: float = NETWORK_TIMEOUT,
    strip: bool = True,
) -> str:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=git_env(env),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} timed out after {timeout:.0f}s") from None
    if done.returncode != 0:
        raise GitError(f"git {args[0]}: {done.stderr.strip()[-500:]}")
    return done.stdout.strip() if strip else done.stdout


def validate_ref(ref: str) -> str:
    """A branch, tag or commit name; never an option, a range or a path escape."""
    if not isinstance(ref, str) or not ref:
        raise UserError("ref must be a non-empty string", field="ref")
    if (
        ref.startswith(("-", "/"))
        or ".." in ref
        or "@{" in ref
        or len(ref) > 200
        or not re.fullmatch(r"[A-Za-z0-9._/+-]+", ref)
        or ref.endswith((".lock", "/", "."))
    ):
        raise UserError(f"ref {ref!r} is not a valid branch, tag or commit name", field="ref")
    return ref


def validate_repo(repo: str) -> str:
    """A git URL or an absolute local path."""
    if not isinstance(repo, str) or not repo.strip():
        raise UserError(
            "repo must be a non-empty string: a git URL or an absolute path", field="repo"
        )
    if repo.startswith("-") or "\n" in repo or "\0" in repo:
        raise UserError(f"repo {repo!r} is not a git URL or a path", field="repo")
    if URL_RE.match(repo):
        if re.search(r"(?:://|@)-", repo):  # ssh would read such a host as an option
            raise UserError(f"repo {repo!r}: a host or user may not start with '-'", field="repo")
        return repo
    if not os.path.isabs(repo):
        raise UserError(f"repo {repo!r} must be a git URL or an absolute path", field="repo")
    return os.path.normpath(repo)


@dataclass
class Resolved:
    """A repository and ref pinned to a commit, with what a run needs to know of it."""

    source: str  # what stages clone
    commit: str
    ref: str
    path: str  # the service's folder inside the repository ("" for its root)
    snapshot: bool
    pipeline_text: str | None  # the pipeline file at that commit, if any
    files: set[str]  # names at the service folder's top level
    name: str  # a default service name
    repository: str = ""  # a local repository holding the commit (while the resolve lasts)

    def read(self, name: str) -> str | None:
        """The text of a file of the service folder at the commit; None when there is none.
        A URL's commit is read from the clone in the resolve's scratch folder, so read while
        that still exists."""
        prefix = f"{self.path}/" if self.path else ""
        try:
            return git("cat-file", "blob", f"{self.commit}:{prefix}{name}",
                       cwd=self.repository, strip=False)  # fmt: skip
        except GitError:
            return None


def resolve(repo: str, ref: str | None, snapshots: Path, scratch: Path) -> Resolved:
    """Pin `repo` at `ref` to a commit. A local path's commits are fetched into its store
    under `snapshots` (what stages check out from); without a ref it means its working
    tree: HEAD when that is clean, else a snapshot commit of it made in the store."""
    repo = validate_repo(repo)
    if ref is not None:
        validate_ref(ref)
    if not URL_RE.match(repo):
        return _resolve_local(repo, ref, snapshots)
    ref = ref or "HEAD"
    bare = scratch / "resolve.git"
    try:
        git("clone", "--bare", "--quiet", "--", repo, str(bare))
    except GitError as e:
        raise Unprocessable(f"cannot read repository {repo!r}: {e}", field="repo") from None
    try:
        commit = git(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", cwd=bare
        )
    except GitError:
        raise Unprocessable(f"ref {ref!r} not found in {repo!r}", field="ref") from None
    return _describe(str(bare), commit, ref, "", False, repo, source=repo)


def _resolve_local(path: str, ref: str | None, snapshots: Path) -> Resolved:
    top, rel = _local_repository(path)
    branch, head = _local_head(top)
    store = repository_store(snapshots, top)
    with _locked(store):
        _mirror(top, store)
        if ref is None:
            commit, snapshot = _working_tree_commit(top, store, head)
            ref = branch or commit
        else:
            snapshot, commit = False, _store_commit(store, ref)
            if commit is None:
                raise Unprocessable(f"ref {ref!r} not found in {path!r}", field="ref")
        # Kept while the store is: a run's stages (and their retries) check it out later.
        git("update-ref", f"refs/bases/{commit}", commit, env=_store_env(store))
    return _describe(str(store), commit, ref, rel, snapshot, path)


def _store_commit(store: Path, ref: str) -> str | None:
    """The commit of the repository's `ref` (a branch, a tag, HEAD, a commit) in its store;
    never one of the store's own refs (refs/bases, refs/snapshots...)."""
    if ref == "HEAD":
        names = ["refs/faasci/head"]
    elif ref.startswith("refs/"):
        names = [ref] if ref.startswith(("refs/heads/", "refs/tags/")) else []
    else:
        names = [f"refs/heads/{ref}", f"refs/tags/{ref}", *([ref] if SHA_RE.match(ref) else [])]
    for name in names:
        try:
            return git("rev-parse", "--verify", "--quiet", "--end-of-options",
                       f"{name}^{{commit}}", env=_store_env(store))  # fmt: skip
        except GitError:
            continue
    return None


def find_top(path: str) -> str | None:
    """The working tree holding `path`: the nearest folder upwards (not above
    GIT_CEILING_DIRECTORIES) with a `.git` folder, or a `.git` file naming one (a worktree,
    a submodule). Read from the file system: git is not run in a repository to find it."""
    ceilings = {os.path.realpath(c) for c in os.environ.get("GIT_CEILING_DIRECTORIES", "")
                .split(":") if c}  # fmt: skip
    folder = os.path.realpath(path)
    while True:
        dot_git = os.path.join(folder, ".git")
        if os.path.isfile(os.path.join(dot_git, "HEAD")):
            return folder
        if os.path.isfile(dot_git):
            with contextlib.suppress(OSError, UnicodeDecodeError), open(dot_git) as f:
                if f.read(8) == "gitdir: ":
                    return folder
        parent = os.path.dirname(folder)
        if parent == folder or parent in ceilings:
            return None
        folder = parent


def _local_repository(path: str) -> tuple[str, str]:
    if not os.path.isdir(path):
        raise Unprocessable(f"repository path {path!r} does not exist", field="repo")
    top = find_top(path)
    if top is None:
        raise Unprocessable(f"{path!r} is not inside a git repository", field="repo")
    rel = os.path.relpath(os.path.realpath(path), top)
    if rel.split(os.sep)[0] == ".git":
        raise Unprocessable(f"{path!r} is inside a .git folder, not a working tree", field="repo")
    return top, "" if rel == "." else rel


def _local_head(top: str) -> tuple[str | None, str]:
    """(HEAD's branch or None when detached, HEAD's commit), as upload-pack tells it."""
    try:
        listing = git("ls-remote", "--symref", "--", top, "HEAD")
    except GitError as e:
        raise Unprocessable(f"cannot read repository {top!r}: {e}", field="repo") from None
    branch, head = None, None
    for line in listing.splitlines():
        target, _, name = line.partition("\t")
        if name != "HEAD":
            continue
        if target.startswith("ref: refs/heads/"):
            branch = target.removeprefix("ref: refs/heads/")
        elif SHA_RE.match(target):
            head = target
    if head is None:
        raise Unprocessable(f"repository {top!r} has no commits", field="repo")
    return branch, head


def repository_store(snapshots: Path, top: str) -> Path:
    """The store of faas-ci's own for the repository at `top`: one per repository (its
    cache namespace), so no run ever sees another repository's objects."""
    from .cache import namespace_of  # (cache imports this module)

    return snapshots / f"{namespace_of(top)}.git"


def _store_env(store: Path, **extra: str) -> dict:
    return {"GIT_DIR": str(store.resolve()), **extra}


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """The store to ourselves (every function process of the node may resolve at once)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{store}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (store / "HEAD").exists():
                git("init", "--bare", "--quiet", "--", str(store))
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _mirror(top: str, store: Path) -> None:
    """The repository's branches, tags and HEAD, fetched into the store (upload-pack only
    reads the repository)."""
    try:
        git("fetch", "--quiet", "--no-tags", "--prune", "--no-write-fetch-head",
            "--no-recurse-submodules", "--", top, "+HEAD:refs/faasci/head",
            "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*",
            env=_store_env(store))  # fmt: skip
    except GitError as e:
        raise Unprocessable(f"cannot read repository {top!r}: {e}", field="repo") from None


def _working_tree_commit(top: str, store: Path, head: str) -> tuple[str, bool]:
    """HEAD when the working tree is clean; else a snapshot commit of it (untracked files
    included, ignored ones not), made in the store. The tree is read through the store's
    own index (with its stat cache, so unchanged files are not read again)."""
    head = git("rev-parse", "--verify", "--quiet", "refs/faasci/head^{commit}",
               env=_store_env(store)) or head  # fmt: skip
    index = store / "faasci-index"
    Path(f"{index}.lock").unlink(missing_ok=True)  # left by a killed resolve (we hold the lock)
    _copy_excludes(top, store)
    env = _store_env(store, GIT_WORK_TREE=top, GIT_INDEX_FILE=str(index))
    try:
        git("read-tree", "-m", head, env=env)  # keeps the stat data of unchanged entries
    except GitError:  # an index of another git version, or damaged: start afresh
        index.unlink(missing_ok=True)
        git("read-tree", head, env=env)
    git("add", "--all", cwd=top, env=env)
    tree = git("write-tree", env=env)
    if tree == git("rev-parse", f"{head}^{{tree}}", env=env):
        return head, False
    commit = git("commit-tree", "--no-gpg-sign", tree, "-p", head, "-m",
                 "faas-ci snapshot of the working tree", env=env)  # fmt: skip
    git("update-ref", f"refs/snapshots/{commit}", commit, env=env)
    return commit, True


def _copy_excludes(top: str, store: Path) -> None:
    """The repository's own ignore list (.git/info/exclude) as the store's, so a snapshot
    leaves out what `git status` there leaves out."""
    text = ""
    git_dir = _git_dir(top)
    if git_dir:
        common = git_dir
        with contextlib.suppress(OSError):
            common = os.path.join(git_dir, Path(git_dir, "commondir").read_text().strip())
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(common, "info", "exclude").read_text()
    (store / "info").mkdir(exist_ok=True)
    (store / "info" / "exclude").write_text(text)


def _git_dir(top: str) -> str | None:
    dot_git = os.path.join(top, ".git")
    if os.path.isdir(dot_git):
        return dot_git
    with contextlib.suppress(OSError, UnicodeDecodeError):
        target = Path(dot_git).read_text().strip().removeprefix("gitdir:").strip()
        return os.path.join(top, target)
    return None


def _describe(
    clone_from: str,
    commit: str,
    ref: str,
    path: str,
    snapshot: bool,
    repo: str,
    source: str | None = None,
) -> Resolved:
    prefix = f"{path}/" if path else ""
    listing = git("ls-tree", "--name-only", commit, "--", prefix or ".", cwd=clone_from)
    files = {os.path.basename(line) for line in listing.splitlines()}
    name = os.path.basename(path or repo.rstrip("/").removesuffix(".git")) or "service"
    resolved = Resolved(
        source=source or clone_from,
        commit=commit,
        ref=ref,
        path=path,
        snapshot=snapshot,
        pipeline_text=None,
        files=files,
        name=name,
        repository=clone_from,
    )
    resolved.pipeline_text = resolved.read(".faasci.yml")
    return resolved


def checkout(source: str, commit: str, dest: Path) -> None:
    """A fresh work tree of `commit` at `dest`: a clone of `source` with its objects hard
    linked (git's clone for a URL or a repository not of faas-ci's own), then one checkout."""
    try:
        if _is_store(source):
            _clone_store(Path(source), dest)
        else:
            git("clone", "--quiet", "--template=", "--no-checkout", "--", source, str(dest))
        git("checkout", "--quiet", "--detach", commit, cwd=dest)
    except (GitError, OSError) as e:
        raise GitError(f"checkout of {commit[:12]} from {source}: {e}") from None


def _is_store(source: str) -> bool:
    """A store of faas-ci's own: a local bare repository (see repository_store)."""
    return not URL_RE.match(source) and os.path.isfile(os.path.join(source, "HEAD")) \
        and os.path.isdir(os.path.join(source, "objects"))  # fmt: skip


def _clone_store(store: Path, dest: Path) -> None:
    """What `git clone --no-checkout --template=` of the store writes, written here: clone
    would start three processes (git, a shell, upload-pack) for what is file copying. Its
    objects hard linked (copied from another file system); its branches as origin's, its
    tags as tags (not its own refs/bases, refs/snapshots, refs/faasci); HEAD on origin's
    default branch."""
    dot_git = dest / ".git"
    with open(f"{store}.lock", "a") as lock:  # no fetch or repack of the store meanwhile
        fcntl.flock(lock, fcntl.LOCK_SH)
        link = os.link
        for folder, _dirs, files in os.walk(store / "objects"):
            into = dot_git / os.path.relpath(folder, store)
            into.mkdir(parents=True)
            for name in files:
                try:
                    link(os.path.join(folder, name), into / name)
                except OSError as e:  # scratch in memory, the store on disk: copied, as by git
                    if e.errno != errno.EXDEV:
                        raise
                    link = shutil.copy2
                    link(os.path.join(folder, name), into / name)
        refs = _store_refs(store)
    for folder in ("refs/heads", "refs/tags", "refs/remotes/origin"):
        (dot_git / folder).mkdir(parents=True)
    packed = sorted((_as_clones(name), sha) for name, sha in refs.items())
    (dot_git / "packed-refs").write_text("".join(f"{sha} {name}\n" for name, sha in packed))
    config = [
        "[core]", "\trepositoryformatversion = 0", "\tfilemode = true", "\tbare = false",
        "\tlogallrefupdates = true", '[remote "origin"]', f"\turl = {store}",
        "\tfetch = +refs/heads/*:refs/remotes/origin/*",
    ]  # fmt: skip
    default = (store / "HEAD").read_text().strip().removeprefix("ref: ")
    if default in refs:  # clone's local branch of origin's HEAD (unborn when origin has none)
        (dot_git / default).parent.mkdir(parents=True, exist_ok=True)
        (dot_git / default).write_text(f"{refs[default]}\n")
        (dot_git / "refs/remotes/origin/HEAD").write_text(f"ref: {_as_clones(default)}\n")
    if default.startswith("refs/heads/"):
        branch = default.removeprefix("refs/heads/")
        config += [f'[branch "{branch}"]', "\tremote = origin", f"\tmerge = {default}"]
    (dot_git / "config").write_text("\n".join(config) + "\n")
    (dot_git / "HEAD").write_text(f"ref: {default}\n")


def _as_clones(name: str) -> str:
    """A store's ref as a clone of it names it: its branches are origin's."""
    if name.startswith("refs/heads/"):
        return f"refs/remotes/origin/{name.removeprefix('refs/heads/')}"
    return name


def _store_refs(store: Path) -> dict[str, str]:
    """The store's branches and tags: {refs/heads/x or refs/tags/y: sha} (loose refs over
    packed ones, as git reads them)."""
    refs = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (store / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name.startswith(("refs/heads/", "refs/tags/")):
                refs[name] = sha
    for kind in ("heads", "tags"):
        for folder, _dirs, files in os.walk(store / "refs" / kind):
            for name in files:
                sha = Path(folder, name).read_text().strip()
                if SHA_RE.match(sha):
                    refs[os.path.relpath(os.path.join(folder, name), store)] = sha
    return refs
