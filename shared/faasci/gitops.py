"""GitOps promotion: the promote stage writes the run's image into an environment repository.

    promote:
      gitops:
        repository: git://git.example/envs.git    # a remote git URL (git, https, ssh)
        branch: main
        environments:
          staging:    {refs: [main], file: staging/values.yaml}
          production: {refs: ["refs/tags/v*"], file: production/kustomization.yaml,
                       approval: admin}

The run's ref picks the environment: the first whose `refs` globs match it (a glob starting
with `refs/` is matched against the whole ref, `refs/heads/main`, `refs/tags/v1.2.0`; any
other against the branch or tag name, `main`, `v1.2.0`). A run whose ref matches none
promotes nothing and says so. The file's kind follows its name: a `kustomization.yaml` gets
its `images:` entry (name, newName, digest) set, any other file is Helm values
(`image.repository`, `image.digest`). ruamel.yaml edits it in place, so its comments, key
order and quoting stay as people wrote them.

Promotion: a fresh clone of the environment branch, the file edited, one commit naming the
run, service and commit (author faas-ci), pushed without force. When the push is refused
because someone else pushed meanwhile, the branch is fetched, the clone reset to it and the
edit applied again (PUSH_TRIES times at most). A file already holding the image gets no
commit, so promoting the same digest twice changes nothing. Git runs as faasci.git runs it
(hooks, fsmonitor and signing forced off, no prompts).

An environment with `approval: admin` makes the stage wait (up to its timeout, cancellable)
until an admin approves the run (`POST /function/runs/<run>/approve`, `faasci approve`):
the request and the approval are on the run record (`Run.approval`), which the stage polls.
"""

from __future__ import annotations

import fnmatch
import io
import re
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from . import git as gitcmd
from .errors import Conflict, UserError
from .settings import settings

if TYPE_CHECKING:  # ruamel loads where a file is edited, not in every function's start
    from ruamel.yaml import YAML

PUSH_TRIES = 5  # pushes refused because the branch moved: re-applied on top this often
APPROVAL_POLL_S = 1.0  # how often a stage waiting for an approval reads the run record
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def _env_path(path: str) -> str:
    parts = PurePosixPath(path).parts
    if (not path.strip() or path.startswith("/") or ".." in parts or "\\" in path
            or (parts and parts[0] == ".git")):  # fmt: skip
        raise ValueError(f"{path!r} must be a file path inside the environment repository "
                         "(relative, no '..', not in .git)")  # fmt: skip
    return path


def _glob(value: str) -> str:
    if not value or len(value) > 200 or value.startswith("-"):
        raise ValueError(f"{value!r} is not a ref glob (e.g. main, release/*, refs/tags/v*)")
    return value


class Environment(BaseModel):
    """One target: the refs that promote to it, the file that names its image, and who must
    approve first (None: nobody)."""

    model_config = ConfigDict(extra="forbid")

    refs: list[Annotated[str, AfterValidator(_glob)]] = Field(min_length=1)
    file: str = Field(min_length=1, max_length=300)
    approval: Literal["admin"] | None = None
    # The kustomization's `images:` entry to set: its `name` (default: the entry whose name
    # is the service or the image repository, else a new one named after the service).
    image: str | None = Field(default=None, min_length=1, max_length=255)

    @field_validator("refs", mode="before")
    @classmethod
    def _one_as_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("file")
    @classmethod
    def _inside(cls, path: str) -> str:
        return _env_path(path)

    @property
    def kind(self) -> Literal["kustomize", "helm"]:
        return "kustomize" if PurePosixPath(self.file).name in KUSTOMIZATION_NAMES else "helm"


class GitOpsSpec(BaseModel):
    """The promote stage's environment repository and its environments, in order of
    precedence (the first whose refs match the run's ref is the one promoted to)."""

    model_config = ConfigDict(extra="forbid")

    # Default: the platform's (FAASCI_GITOPS_REPOSITORY; `faasci up` serves one).
    repository: str | None = Field(default=None, min_length=1, max_length=500)
    branch: str = Field(default="main", min_length=1, max_length=200)
    environments: dict[str, Environment] = Field(min_length=1)

    @field_validator("repository")
    @classmethod
    def _repository(cls, repo: str | None) -> str | None:
        if repo is None:
            return None
        try:
            gitcmd.validate_repo(repo)
        except UserError as e:
            raise ValueError(e.message) from None
        # A pipeline file is the repository's to write, the function's disk is not: a path
        # (or file://) could push into any repository there, the snapshot store's included.
        if not gitcmd.URL_RE.match(repo) or repo.startswith("file:"):
            raise ValueError(f"{repo!r} must be a remote git URL (git://, https://, ssh)")
        return repo

    @field_validator("branch")
    @classmethod
    def _branch(cls, branch: str) -> str:
        try:
            gitcmd.validate_ref(branch)
        except UserError as e:
            raise ValueError(e.message) from None
        return branch.removeprefix("refs/heads/")

    @field_validator("environments")
    @classmethod
    def _names(cls, environments: dict) -> dict:
        for name in environments:
            if not re.match(NAME_RE, name):
                raise ValueError(f"environment name {name!r}: letters, digits, '.', '_', '-'")
        return environments


# Which environment a run's ref promotes to.


def ref_names(ref: str, kind: str | None = None) -> tuple[str | None, str]:
    """(the whole ref or None when unknown, the branch or tag name). `kind` says what a short
    ref is ("heads" or "tags", as the repository tells: full_ref)."""
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref, ref.removeprefix(prefix)
    return (f"refs/{kind}/{ref}" if kind else None), ref


def matches(ref: str, globs: list[str], kind: str | None = None) -> bool:
    """Does the ref match one of the globs? `refs/…` globs compare the whole ref, the others
    the branch or tag name: `main` matches `main` and `refs/heads/main`."""
    whole, short = ref_names(ref, kind)
    for glob in globs:
        if glob.startswith("refs/"):
            if whole and fnmatch.fnmatchcase(whole, glob):
                return True
        elif fnmatch.fnmatchcase(short, glob):
            return True
    return False


def select(spec: GitOpsSpec, ref: str, kind: str | None = None) -> str | None:
    """The name of the first environment the ref promotes to; None when it matches none."""
    return next((name for name, env in spec.environments.items()
                 if matches(ref, env.refs, kind)), None)  # fmt: skip


def ref_kind(source: str, ref: str, timeout: float = 30) -> str | None:
    """Whether a short ref is a branch ("heads") or a tag ("tags") of the repository the run
    was checked out from, as git resolves it (branches first); None when neither (a commit)
    or when the repository cannot say."""
    if ref.startswith("refs/"):
        return None
    try:
        listing = gitcmd.git("ls-remote", "--heads", "--tags", "--", source,
                             f"refs/heads/{ref}", f"refs/tags/{ref}", timeout=timeout)  # fmt: skip
    except gitcmd.GitError:
        return None
    found = {line.partition("\t")[2] for line in listing.splitlines()}
    return next((k for k in ("heads", "tags") if f"refs/{k}/{ref}" in found), None)


# Editing the target file.


class PromotionFailed(Exception):
    """The promotion failed. `reason`: "infra" (git transport: retried like any
    infrastructure failure), "promotion" (the configuration or the file is wrong: retrying
    would not help, never retried), "approval" (no admin approved in time: never retried),
    "cancelled", "timeout"."""

    def __init__(self, message: str, reason: str = "promotion"):
        super().__init__(message)
        self.reason = reason


def split_image(image: str) -> tuple[str, str]:
    """repository@sha256:… as (repository, digest)."""
    repository, at, digest = image.partition("@")
    if not at or not repository or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise PromotionFailed(f"image {image!r} is not named by digest (repository@sha256:…)")
    return repository, digest


def _indents(text: str) -> tuple[int, int]:
    """The file's own (mapping indent, offset of a sequence's dash under its key), so the
    edited file is written the way it was (`  - name:` stays so, `- name:` too)."""
    mapping = offset = None
    above, opens = 0, False  # the previous line's content column, and whether it ends in ':'
    for line in text.splitlines():
        content = line.lstrip(" ")
        if not content or content.startswith(("#", "---")):
            continue
        column = len(line) - len(content)
        if opens and column >= above:
            if content.startswith("- "):
                offset = column - above if offset is None else offset
            elif column > above and mapping is None:
                mapping = column - above
        dash = len(content) - len(content.lstrip("- ")) if content.startswith("- ") else 0
        above, opens = column + dash, content.split(" #")[0].rstrip().endswith(":")
    return mapping or 2, offset or 0


def _yaml(text: str) -> tuple[YAML, object]:
    """A round-trip YAML writing as the file is written, and the document."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    yaml = YAML()  # round-trip: comments, order and quotes survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    mapping, offset = _indents(text)
    yaml.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    try:
        return yaml, yaml.load(text)
    except YAMLError as e:
        raise PromotionFailed(f"not valid YAML: {str(e).splitlines()[0]}") from None


def _dump(yaml: YAML, data) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def edit(text: str, kind: str, image: str, service: str, entry: str | None = None) -> str:
    """The file's text with `image` written in (`kind`: "helm" or "kustomize"); the very same
    text when it already names that image."""
    from ruamel.yaml.comments import CommentedMap

    repository, digest = split_image(image)
    yaml, data = _yaml(text)
    if data is None:
        data = CommentedMap()
    if not isinstance(data, dict):
        raise PromotionFailed("the file must hold a YAML mapping")
    changed = (_set_kustomize(data, repository, digest, service, entry) if kind == "kustomize"
               else _set_helm(data, repository, digest))  # fmt: skip
    return _dump(yaml, data) if changed else text


def _set_helm(data: dict, repository: str, digest: str) -> bool:
    image = data.get("image")
    if image is None:
        image = data["image"] = type(data)()  # a map of the document's kind (CommentedMap)
    if not isinstance(image, dict):
        raise PromotionFailed("`image` must be a mapping (repository, digest)")
    if image.get("repository") == repository and image.get("digest") == digest:
        return False
    image["repository"], image["digest"] = repository, digest
    return True


def _set_kustomize(data: dict, repository: str, digest: str, service: str,
                   name: str | None) -> bool:  # fmt: skip
    images = data.get("images")
    if images is None:
        images = data["images"] = []
    if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
        raise PromotionFailed("`images` must be a list of mappings (name, newName, digest)")
    wanted = (
        (lambda i: i.get("name") == name)
        if name
        else (lambda i: i.get("name") in (service, repository) or i.get("newName") == repository)
    )
    found = next((i for i in images if wanted(i)), None)
    if found is None:
        found = type(data)(name=name or service)
        images.append(found)
    elif (found.get("newName") == repository and found.get("digest") == digest
          and "newTag" not in found):  # fmt: skip
        return False
    found["newName"], found["digest"] = repository, digest
    found.pop("newTag", None)  # the digest names the image; a tag beside it would only mislead
    return True


def target_path(root: Path, rel: str) -> Path:
    """The file inside the clone at `root`; refused when it is missing, not a regular file,
    or reached through a symbolic link (which could point out of the clone)."""
    path = root / _env_path(rel)
    for part in [path, *path.parents]:
        if part == root:
            break
        if part.is_symlink():
            raise PromotionFailed(f"{rel}: {part.relative_to(root)} is a symbolic link")
    if not path.is_file():
        raise PromotionFailed(f"{rel} does not exist on the environment branch")
    return path


# Promoting: clone, edit, commit, push; fetch and re-apply when someone pushed meanwhile.


class Promotion(BaseModel):
    """What the promote stage did (the attempt's `promotion`)."""

    environment: str | None  # None: the run's ref matches no environment
    repository: str  # the environment repository (without credentials)
    file: str | None = None
    image: str | None = None
    commit: str | None = None  # the environment repository's new commit; None: unchanged
    approved_by: str | None = None  # the admin who approved, for an environment that asks


def display_url(url: str) -> str:
    """The URL without its user information (a token in https://user:token@host/…)."""
    parts = urlsplit(url) if "://" in url else None
    if parts and parts.password is not None:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return parts._replace(netloc=netloc).geturl()
    return url


def message(environment: str, service: str, image: str, run_id: str, commit: str) -> str:
    return (f"Promote {service} to {environment} (run {run_id}, commit {commit[:12]})\n\n"
            f"Faasci-Run: {run_id}\nFaasci-Service: {service}\nFaasci-Commit: {commit}\n"
            f"Faasci-Image: {image}\n")  # fmt: skip


def promote(spec: GitOpsSpec, environment: str, image: str, *, run_id: str, service: str,
            commit: str, say: Callable[[str], None], deadline: float,
            stop: threading.Event | None = None, scratch: Path | None = None,
            approved_by: str | None = None) -> Promotion:  # fmt: skip
    """Write `image` into the environment's file on the branch and push it; the commit made,
    or None when the file already named the image."""
    env, url = spec.environments[environment], spec.repository
    shown = display_url(url)
    done = Promotion(environment=environment, repository=shown, file=env.file, image=image,
                     approved_by=approved_by)  # fmt: skip
    branch = spec.branch

    def run_git(*args: str, cwd: Path | None = None) -> str:
        if stop is not None and stop.is_set():
            raise PromotionFailed("cancelled while promoting", "cancelled")
        left = deadline - time.monotonic()
        if left <= 0:
            raise PromotionFailed("timed out while promoting", "timeout")
        try:
            return gitcmd.git(*args, cwd=cwd, timeout=min(gitcmd.NETWORK_TIMEOUT, left))
        except gitcmd.GitError as e:
            raise gitcmd.GitError(_scrub(str(e), url)) from None

    with tempfile.TemporaryDirectory(prefix="faasci-gitops-", dir=scratch) as tmp:
        work = Path(tmp) / "env"
        try:
            run_git("clone", "--quiet", "--no-tags", "--single-branch", "--branch", branch,
                    "--", url, str(work))  # fmt: skip
        except gitcmd.GitError as e:
            missing = "not found in upstream" in str(e)
            raise PromotionFailed(f"cannot clone branch {branch} of {shown}: {e}",
                                  "promotion" if missing else "infra") from None  # fmt: skip
        remote = f"refs/remotes/origin/{branch}"
        for tries in range(1, PUSH_TRIES + 1):
            target = target_path(work, env.file)
            old = target.read_text()
            try:
                new = edit(old, env.kind, image, service, env.image)
            except PromotionFailed as e:
                raise PromotionFailed(f"{env.file}: {e}") from None
            if new == old:
                say(f"{environment}: {env.file} already names {image}; nothing to commit")
                return done
            target.write_text(new)
            run_git("add", "--", env.file, cwd=work)
            run_git("commit", "--quiet", "--no-verify", "-m",
                    message(environment, service, image, run_id, commit), cwd=work)  # fmt: skip
            base = run_git("rev-parse", remote, cwd=work)
            try:  # never forced: a refspec without '+', no --force
                run_git("push", "--quiet", "--", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
            except gitcmd.GitError as e:
                refused = e
            else:
                done.commit = run_git("rev-parse", "HEAD", cwd=work)
                say(f"{environment}: pushed {done.commit[:12]} to {branch} of {shown} "
                    f"({env.file} names {image})")  # fmt: skip
                return done
            try:
                run_git("fetch", "--quiet", "--no-tags", "--", "origin",
                        f"+refs/heads/{branch}:{remote}", cwd=work)  # fmt: skip
            except gitcmd.GitError as e:
                raise PromotionFailed(f"push refused ({refused}); fetching failed: {e}",
                                      "infra") from None  # fmt: skip
            moved = run_git("rev-parse", remote, cwd=work) != base
            if not moved and "lock" not in str(refused):
                raise PromotionFailed(f"push to {shown} refused: {refused}", "infra")
            say(f"{branch} of {shown} moved while promoting (someone else pushed); "
                f"re-applying on top of it (try {tries + 1} of {PUSH_TRIES})")  # fmt: skip
            run_git("reset", "--quiet", "--hard", remote, cwd=work)
            if not moved:  # the ref was locked by another push in flight: let it land
                time.sleep(0.2 * tries)
        raise PromotionFailed(f"{branch} of {shown} kept moving: not pushed after "
                              f"{PUSH_TRIES} tries", "infra")  # fmt: skip


def _scrub(text: str, url: str) -> str:
    parts = urlsplit(url) if "://" in url else None
    if parts and parts.password:
        text = text.replace(parts.password, "***")
    return text


# Approval by an admin: on the run record (Run.approval).


class Approval(BaseModel):
    """A promotion waiting for (at None) or given (by, at) an admin's approval."""

    environment: str
    requested_at: datetime
    by: str | None = None  # the approving admin (audit actor form: user:<subject>)
    at: datetime | None = None


def request_approval(run, environment: str) -> Approval:
    """The promote stage asks for an approval (kept when one was asked or given already for
    the same environment, e.g. by an earlier attempt)."""
    if run.approval is None or run.approval.environment != environment:
        run.approval = Approval(environment=environment, requested_at=datetime.now(UTC))
    return run.approval.model_copy()


def approve(run, actor: str) -> Approval:
    """An admin approves the promotion the run waits for; Conflict when it waits for none."""
    if run.finished:
        raise Conflict(f"run {run.id} is already {run.status}", field="run_id")
    if run.approval is None:
        raise Conflict(f"run {run.id} is not waiting for an approval", field="run_id")
    if run.approval.by:
        raise Conflict(f"run {run.id} was already approved by {run.approval.by}",
                       field="run_id")  # fmt: skip
    run.approval.by, run.approval.at = actor, datetime.now(UTC)
    return run.approval.model_copy()


def wait_for_approval(run_id: str, environment: str, say: Callable[[str], None],
                      deadline: float, stop: threading.Event) -> str:  # fmt: skip
    """Ask for an admin's approval on the run record and wait for it; who approved."""
    from . import services  # (services imports the run store, which imports this module)

    store = services.run_store()
    asked, _ = store.update(run_id, lambda r: request_approval(r, environment),
                            "run.approval_requested")  # fmt: skip
    approval = asked.approval
    if approval.by:
        say(f"{environment}: approved by {approval.by}")
        return approval.by
    say(f"{environment} needs an admin's approval: waiting (faasci approve {run_id}, or "
        f"POST /function/runs/{run_id}/approve)")  # fmt: skip
    while not stop.wait(APPROVAL_POLL_S):
        try:
            approval = store.get(run_id).approval
        except Exception:  # NATS restarting: the watcher keeps the heartbeat meanwhile
            continue
        if approval and approval.by:
            say(f"{environment}: approved by {approval.by}")
            return approval.by
        if time.monotonic() >= deadline:
            raise PromotionFailed(f"no admin approved the promotion to {environment} in time",
                                  "approval")  # fmt: skip
    raise PromotionFailed("cancelled while waiting for an approval", "cancelled")


def run_promotion(run, spec: GitOpsSpec, timeout: float, say: Callable[[str], None],
                  stop: threading.Event, scratch: Path | None = None) -> Promotion:  # fmt: skip
    """The promote stage's delivery: the run's image to the environment its ref picks, after
    an admin's approval when that environment asks for one."""
    deadline = time.monotonic() + timeout
    if spec.repository is None:
        if not settings().gitops_repository:
            raise PromotionFailed("gitops.repository is not set, and the platform names no "
                                  "environment repository (FAASCI_GITOPS_REPOSITORY)")  # fmt: skip
        spec = spec.model_copy(update={"repository": settings().gitops_repository})
    kind = ref_kind(run.source, run.ref)
    environment = select(spec, run.ref, kind)
    shown = display_url(spec.repository)
    if run.snapshot:
        say("a snapshot of uncommitted work is never promoted; nothing promoted")
        return Promotion(environment=None, repository=shown)
    if environment is None:
        say(f"ref {run.ref} matches no environment of {shown} "
            f"({', '.join(spec.environments)}); nothing promoted")  # fmt: skip
        return Promotion(environment=None, repository=shown)
    if not run.image:
        raise PromotionFailed("nothing to promote: no build stage of this run pushed an image")
    env = spec.environments[environment]
    say(f"ref {run.ref} promotes to {environment} ({env.file} in {shown})")
    approved_by = None
    if env.approval == "admin":
        approved_by = wait_for_approval(run.id, environment, say, deadline, stop)
        # An approval given at the last moment still leaves the push its time.
        deadline = max(deadline, time.monotonic() + gitcmd.NETWORK_TIMEOUT)
    return promote(spec, environment, run.image, run_id=run.id, service=run.service,
                   commit=run.commit, say=say, deadline=deadline, stop=stop, scratch=scratch,
                   approved_by=approved_by)  # fmt: skip
