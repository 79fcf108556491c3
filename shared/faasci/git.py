"""Git: validating what callers name, resolving it to a commit, checking a commit out.

Every git call passes user input after `--` or as a validated value, never where git
could read it as an option (a ref like `--upload-pack=...` is refused before git runs).
"""

from __future__ import annotations

import os
import re
import subprocess
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
            env={**os.environ, **GIT_ENV, **(env or {})},
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
    """Pin `repo` at `ref` to a commit. A local path without a ref means its working tree:
    when that has uncommitted changes, a snapshot commit of it is stored in `snapshots`."""
    repo = validate_repo(repo)
    if ref is not None:
        validate_ref(ref)
    source, path, snapshot = repo, "", False
    if not URL_RE.match(repo):
        source, path = _local_repository(repo)
        if ref is None:
            commit, snapshot = _working_tree_commit(source, snapshots)
            if snapshot:
                source = str(snapshots)
            ref = ref or _current_branch(repo) or commit
            return _describe(source, commit, ref, path, snapshot, repo)
    ref = ref or "HEAD"
    bare = scratch / "resolve.git"
    try:
        git("clone", "--bare", "--quiet", "--", source, str(bare))
    except GitError as e:
        raise Unprocessable(f"cannot read repository {repo!r}: {e}", field="repo") from None
    try:
        commit = git(
            "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", cwd=bare
        )
    except GitError:
        raise Unprocessable(f"ref {ref!r} not found in {repo!r}", field="ref") from None
    return _describe(str(bare), commit, ref, path, False, repo, source=source)


def _local_repository(path: str) -> tuple[str, str]:
    if not os.path.isdir(path):
        raise Unprocessable(f"repository path {path!r} does not exist", field="repo")
    try:
        top = git("rev-parse", "--show-toplevel", cwd=path)
    except GitError:
        raise Unprocessable(f"{path!r} is not inside a git repository", field="repo") from None
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(top))
    return top, "" if rel == "." else rel


def _current_branch(path: str) -> str | None:
    try:
        return git("symbolic-ref", "--quiet", "--short", "HEAD", cwd=path) or None
    except GitError:
        return None


def _working_tree_commit(top: str, snapshots: Path) -> tuple[str, bool]:
    """HEAD when the working tree is clean; else a snapshot commit of it (untracked files
    included, ignored ones not), stored in the snapshot store. Nothing is written into the
    repository (its objects, refs, index or hooks), so it may even be mounted read-only."""
    reading = {"GIT_OPTIONAL_LOCKS": "0"}  # `status` must not refresh the user's index
    try:
        head = git("rev-parse", "--verify", "--quiet", "HEAD^{commit}", cwd=top, env=reading)
    except GitError:
        raise Unprocessable(f"repository {top!r} has no commits", field="repo") from None
    if not git("status", "--porcelain", "--untracked-files=all", cwd=top, env=reading):
        return head, False
    if not (snapshots / "HEAD").exists():
        git("init", "--bare", "--quiet", str(snapshots))
    # The store gets HEAD's history first (a fetch only reads the repository), then the
    # snapshot's new objects are written straight into the store, never into the repository.
    git("fetch", "--quiet", "--no-tags", "--", top, f"+HEAD:refs/snapshot-bases/{head}",
        cwd=snapshots)  # fmt: skip
    index = snapshots.parent / f"snapshot-index-{os.getpid()}-{id(top)}"
    into_store = {**reading, "GIT_INDEX_FILE": str(index),
                  "GIT_OBJECT_DIRECTORY": str((snapshots / "objects").resolve())}  # fmt: skip
    try:
        git("read-tree", head, cwd=top, env=into_store)
        git("add", "--all", cwd=top, env=into_store)
        tree = git("write-tree", cwd=top, env=into_store)
        commit = git("commit-tree", tree, "-p", head, "-m", "faas-ci snapshot of the working tree",
                     cwd=top, env=into_store)  # fmt: skip
    finally:
        index.unlink(missing_ok=True)
    git("update-ref", f"refs/snapshots/{commit}", commit, cwd=snapshots)
    return commit, True


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
    """A fresh work tree of `commit` at `dest` (a local source is cloned with hard links)."""
    try:
        git("clone", "--quiet", "--no-checkout", "--", source, str(dest))
        git("checkout", "--quiet", "--detach", commit, cwd=dest)
    except GitError as e:
        raise GitError(f"checkout of {commit[:12]} from {source}: {e}") from None
