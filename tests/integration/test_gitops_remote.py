"""GitOps promotion against a real git remote (git daemon on 127.0.0.1, the `env_repo`
fixture, which refuses force pushes and logs every update of main): one promotion is one
commit naming run, service and commit; the same digest again adds none; promotions that race
all land, on a history that only ever moved forward."""

import subprocess
import threading
import time

import pytest
from conftest import commit_all, git

from faasci import gitops

DIGEST = "sha256:" + "1" * 64
IMAGE = f"127.0.0.1:25000/sample-service@{DIGEST}"


def spec(env_repo, **extra) -> gitops.GitOpsSpec:
    return gitops.GitOpsSpec(repository=env_repo.url, environments={
        "staging": {"refs": ["main"], "file": "staging/values.yaml"},
        "production": {"refs": ["v*"], "file": "production/kustomization.yaml"},
        **extra,
    })  # fmt: skip


def promote(env_repo, environment="staging", image=IMAGE, service="sample-service",
            run_id="20261127-120000-abcdef", lines=None, **extra):  # fmt: skip
    said = [] if lines is None else lines
    return gitops.promote(spec(env_repo, **extra), environment, image, run_id=run_id,
                          service=service, commit="c0ffee" * 6 + "abcd", say=said.append,
                          deadline=time.monotonic() + 60)  # fmt: skip


def history(env_repo) -> list[str]:
    return git(env_repo.path, "rev-list", "main").splitlines()


def show(env_repo, rel: str, rev: str = "main") -> str:
    return git(env_repo.path, "show", f"{rev}:{rel}")


def only_moved_forward(env_repo) -> None:
    """Every update main's reflog holds was a fast-forward of the one before, and the
    history is linear (no merge commits): nothing was ever forced."""
    updates = git(env_repo.path, "reflog", "show", "--format=%H", "refs/heads/main").split()
    for newer, older in zip(updates, updates[1:], strict=False):
        subprocess.run(["git", "merge-base", "--is-ancestor", older, newer], cwd=env_repo.path,
                       check=True)  # fmt: skip
    assert git(env_repo.path, "rev-list", "--merges", "main") == ""


def test_a_promotion_adds_one_commit_naming_run_service_and_commit(env_repo):
    """One new commit on main by faas-ci, its message naming the run, the service and the
    commit; staging/values.yaml holds the repository and digest, its comment kept."""
    before = history(env_repo)
    lines = []
    done = promote(env_repo, lines=lines)
    after = history(env_repo)
    assert after[1:] == before and after[0] == done.commit
    assert (done.environment, done.file, done.image) == ("staging", "staging/values.yaml", IMAGE)
    values = show(env_repo, "staging/values.yaml")
    assert "repository: 127.0.0.1:25000/sample-service" in values
    assert f"digest: {DIGEST}" in values and "# set by faas-ci" in values
    msg = git(env_repo.path, "log", "-1", "--format=%an%n%B", "main")
    assert msg.startswith("faas-ci\nPromote sample-service to staging "
                          "(run 20261127-120000-abcdef, commit c0ffeec0ffee)")  # fmt: skip
    assert "Faasci-Commit: " + "c0ffee" * 6 + "abcd" in msg
    assert git(env_repo.path, "diff", "--name-only", f"{done.commit}~1", done.commit) == (
        "staging/values.yaml"
    )
    assert any(f"pushed {done.commit[:12]}" in line for line in lines)


def test_the_same_digest_twice_adds_no_commit(env_repo):
    """A second promotion of the digest finds it in place: no commit, `commit` None, and
    it says so; another digest then adds one commit again."""
    first = promote(env_repo, "production")
    lines = []
    second = promote(env_repo, "production", lines=lines)
    assert second.commit is None and history(env_repo)[0] == first.commit
    assert any("already names" in line for line in lines)
    third = promote(env_repo, "production", image=IMAGE.replace("1" * 64, "2" * 64))
    assert history(env_repo)[:2] == [third.commit, first.commit]
    kustomization = show(env_repo, "production/kustomization.yaml")
    assert "digest: sha256:" + "2" * 64 in kustomization and "deployment.yaml" in kustomization


def test_a_push_that_lost_the_race_is_reapplied_on_top(env_repo, tmp_path, monkeypatch):
    """Someone pushes to main between our clone and our push: the refused push is followed
    by a fetch, a reset and the edit applied again; both commits land, nothing forced."""
    other = tmp_path / "other"
    git(tmp_path, "clone", "--quiet", env_repo.url, str(other))
    real_edit, pushed = gitops.edit, []

    def edit_then_someone_pushes(*args, **kwargs):
        if not pushed:  # the first time only: after our clone, before our push
            (other / "staging" / "values.yaml").write_text("replicaCount: 3\n")
            pushed.append(commit_all(other, "a person scales staging"))
            git(other, "push", "--quiet", "origin", "main")
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(gitops, "edit", edit_then_someone_pushes)
    lines = []
    done = promote(env_repo, lines=lines)
    assert history(env_repo)[:2] == [done.commit, pushed[0]]
    assert any("re-applying on top" in line for line in lines)
    values = show(env_repo, "staging/values.yaml")
    assert f"digest: {DIGEST}" in values and "replicaCount: 3" in values
    only_moved_forward(env_repo)


def test_racing_promotions_all_land_without_force(env_repo):
    """Four promotions at once (two services' files, the same file twice): every one lands
    as its own commit, the history is linear and main only ever moved forward."""
    before = history(env_repo)
    extra = {f"svc{n}": {"refs": ["main"], "file": f"svc{n}/values.yaml"} for n in range(2)}
    for n in range(2):  # two more services' values files
        seed = env_repo.path.parent / f".more-{env_repo.path.name}"
        if not seed.exists():
            git(env_repo.path.parent, "clone", "--quiet", env_repo.url, str(seed))
        (seed / f"svc{n}").mkdir()
        (seed / f"svc{n}" / "values.yaml").write_text("image: {}\n")
        commit_all(seed, f"svc{n}")
        git(seed, "push", "--quiet", "origin", "main")
    base = history(env_repo)
    jobs = [("svc0", "svc0"), ("svc1", "svc1"), ("staging", "svc-a"), ("staging", "svc-b")]
    results, errors, start, lines = {}, [], threading.Barrier(len(jobs)), []

    def one(environment, service, n):
        try:
            start.wait()
            results[service] = promote(env_repo, environment, service=service,
                                       image=IMAGE.replace("1" * 64, str(n) * 64),
                                       lines=lines, **extra)  # fmt: skip
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(env, svc, n + 3))
               for n, (env, svc) in enumerate(jobs)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    after = history(env_repo)
    assert len(after) == len(base) + len(jobs) and after[len(jobs) :] == base
    assert {r.commit for r in results.values()} == set(after[: len(jobs)])
    assert "sha256:" + "3" * 64 in show(env_repo, "svc0/values.yaml")
    assert "sha256:" + "4" * 64 in show(env_repo, "svc1/values.yaml")
    assert len(before) < len(base)
    assert any("re-applying on top" in line for line in lines)  # they did race
    only_moved_forward(env_repo)


def test_a_missing_branch_or_file_fails_without_retry(env_repo):
    """A branch the environment repository lacks, or a file not on it: the promotion fails
    as `promotion` (a configuration to fix, never retried), naming what is missing."""
    s = spec(env_repo, qa={"refs": ["qa"], "file": "qa/values.yaml"})
    with pytest.raises(gitops.PromotionFailed, match="qa/values.yaml does not exist") as e:
        gitops.promote(s, "qa", IMAGE, run_id="r", service="s", commit="c" * 40,
                       say=lambda _: None, deadline=time.monotonic() + 60)  # fmt: skip
    assert e.value.reason == "promotion"
    s.branch = "release"
    with pytest.raises(gitops.PromotionFailed, match="cannot clone branch release") as e:
        gitops.promote(s, "staging", IMAGE, run_id="r", service="s", commit="c" * 40,
                       say=lambda _: None, deadline=time.monotonic() + 60)  # fmt: skip
    assert e.value.reason == "promotion"


def test_a_cancelled_promotion_stops_before_pushing(env_repo):
    """With the stage's stop event set, nothing is cloned or pushed."""
    stop = threading.Event()
    stop.set()
    with pytest.raises(gitops.PromotionFailed, match="cancelled") as e:
        gitops.promote(spec(env_repo), "staging", IMAGE, run_id="r", service="s",
                       commit="c" * 40, say=lambda _: None, deadline=time.monotonic() + 60,
                       stop=stop)  # fmt: skip
    assert e.value.reason == "cancelled" and len(history(env_repo)) == 1
