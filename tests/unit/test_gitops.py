"""GitOps promotion without a remote: the pipeline file's `gitops` model (errors name the
field), which environment a ref picks, the edits to Helm values and kustomizations (other
content, comments and layout kept; the same image twice changes nothing), and the approval
transitions on the run record."""

import textwrap
import threading
from datetime import UTC, datetime

import pytest

from faasci import gitops, pipeline, runs
from faasci.errors import Conflict, Unprocessable

IMAGE = "127.0.0.1:25000/sample-service@sha256:" + "a" * 64
OTHER = "127.0.0.1:25000/sample-service@sha256:" + "b" * 64

PIPELINE = """\
service: sample-service
stages:
  promote:
    gitops:
      repository: git://127.0.0.1:9418/envs.git
      environments:
        staging: {refs: [main], file: staging/values.yaml}
        production: {refs: ["v*"], file: production/kustomization.yaml, approval: admin}
"""


def spec(**environments) -> gitops.GitOpsSpec:
    return gitops.GitOpsSpec(repository="git://127.0.0.1/envs.git", environments=environments)


def test_a_promote_stage_may_consist_of_gitops_alone():
    """A promote stage with `gitops` and no commands is valid; its environments keep their
    order, the file kind follows the file name, the branch defaults to main."""
    stage = pipeline.parse(PIPELINE, "x").stages["promote"]
    assert stage.run == [] and stage.gitops.branch == "main"
    assert list(stage.gitops.environments) == ["staging", "production"]
    staging, production = stage.gitops.environments.values()
    assert (staging.kind, staging.approval) == ("helm", None)
    assert (production.kind, production.approval) == ("kustomize", "admin")


@pytest.mark.parametrize(
    "change, field",
    [
        (("staging/values.yaml", "../outside.yaml"), "file"),
        (("staging/values.yaml", "/etc/passwd"), "file"),
        (("staging/values.yaml", ".git/config"), "file"),
        (("approval: admin", "approval: anyone"), "approval"),
        (("git://127.0.0.1:9418/envs.git", "relative/path"), "repository"),
        (("git://127.0.0.1:9418/envs.git", "/srv/faasci/data/snapshots.git"), "repository"),
        (("git://127.0.0.1:9418/envs.git", "file:///srv/envs.git"), "repository"),
        (("git://127.0.0.1:9418/envs.git", "--upload-pack=touch /tmp/x"), "repository"),
        (("{refs: [main]", "{refs: []"), "refs"),
    ],
)
def test_a_bad_gitops_block_is_422_naming_the_field(change, field):
    """Paths outside the environment repository, an unknown approver, a URL git would read
    as an option, a repository on the function's own disk, no refs: each refused with the
    field named."""
    with pytest.raises(Unprocessable) as e:
        pipeline.parse(PIPELINE.replace(*change), "x")
    assert e.value.field.startswith("stages.promote.gitops") and field in e.value.field


def test_gitops_belongs_to_the_promote_stage_only():
    """`gitops` on another stage is refused, naming it."""
    text = PIPELINE.replace("  promote:", "  deploy:")
    with pytest.raises(Unprocessable, match="deploy.gitops: only the promote stage"):
        pipeline.parse(text, "x")


@pytest.mark.parametrize(
    "ref, kind, expected",
    [
        ("main", None, "staging"),
        ("refs/heads/main", None, "staging"),
        ("v1.2.0", "tags", "production"),
        ("refs/tags/v1.2.0", None, "production"),
        ("feature/x", "heads", None),
        # a branch named like a tag is no tag: `refs/tags/…` globs compare the whole ref
        ("refs/heads/v9", None, None),
        ("v9", "heads", None),
        ("v1.2.0", None, None),  # a short ref the repository cannot place
        ("release/2.1", "heads", "staging"),
    ],
)
def test_the_runs_ref_picks_the_environment(ref, kind, expected):
    """Short globs match the branch or tag name (main and refs/heads/main alike); `refs/`
    globs the whole ref; the first matching environment wins; none: None."""
    s = spec(
        staging={"refs": ["main", "release/*"], "file": "s/values.yaml"},
        production={"refs": ["refs/tags/v*"], "file": "p/kustomization.yaml"},
    )
    assert gitops.select(s, ref, kind) == expected


def test_short_globs_match_tags_by_name():
    """`v*` matches the tag v1.2.0 whether the run recorded it as v1.2.0 or refs/tags/v1.2.0."""
    s = spec(production={"refs": "v*", "file": "p/values.yaml"})
    assert gitops.select(s, "v1.2.0") == gitops.select(s, "refs/tags/v1.2.0") == "production"
    assert gitops.select(s, "main") is None


HELM = """\
# staging: Helm values
replicaCount: 2  # two pods
image:
  repository: old/repo   # set by faas-ci
  tag: "1.0"
  pullPolicy: IfNotPresent
resources:
  limits: {cpu: 100m}
hosts:
  - a.example
"""


def test_helm_values_get_repository_and_digest_and_keep_the_rest():
    """image.repository and image.digest are written; comments, quotes, other keys and the
    list layout are as they were."""
    out = gitops.edit(HELM, "helm", IMAGE, "sample-service")
    assert out == HELM.replace("old/repo  ", "127.0.0.1:25000/sample-service").replace(
        "  pullPolicy: IfNotPresent\n",
        "  pullPolicy: IfNotPresent\n  digest: sha256:" + "a" * 64 + "\n",
    )


def test_helm_values_without_an_image_section_get_one():
    """An empty values file, or one without `image`, gets image.repository/digest."""
    from ruamel.yaml import YAML

    for text in ("", "replicaCount: 1\n"):
        data = YAML(typ="safe").load(gitops.edit(text, "helm", IMAGE, "svc"))
        assert data["image"] == {"repository": IMAGE.split("@")[0], "digest": "sha256:" + "a" * 64}


KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - deployment.yaml  # the app
images:
  - name: sample-service
    newTag: "1.0"
  - name: other
    newName: example/other
"""


def test_a_kustomization_entry_gets_new_name_and_digest():
    """The service's `images:` entry gets newName and digest (its tag dropped: the digest
    names the image); the other entry, resources and comments stay."""
    out = gitops.edit(KUSTOMIZATION, "kustomize", IMAGE, "sample-service")
    assert out == KUSTOMIZATION.replace(
        '    newTag: "1.0"\n',
        "    newName: 127.0.0.1:25000/sample-service\n    digest: sha256:" + "a" * 64 + "\n",
    )


def test_a_kustomization_without_the_entry_gets_one():
    """No entry for the service: one is added (named after the service, or the configured
    `image`), the file's `- ` layout kept."""
    text = "resources:\n- deployment.yaml\n"
    out = gitops.edit(text, "kustomize", IMAGE, "svc", entry="ghcr.io/acme/svc")
    assert out == text + textwrap.dedent(f"""\
        images:
        - name: ghcr.io/acme/svc
          newName: 127.0.0.1:25000/sample-service
          digest: sha256:{"a" * 64}
        """)


@pytest.mark.parametrize("kind, text", [("helm", HELM), ("kustomize", KUSTOMIZATION)])
def test_the_same_image_twice_changes_nothing(kind, text):
    """Written once, the file is returned unchanged for the same image, changed for another."""
    once = gitops.edit(text, kind, IMAGE, "sample-service")
    assert once != text
    assert gitops.edit(once, kind, IMAGE, "sample-service") is once
    assert gitops.edit(once, kind, OTHER, "sample-service") != once


@pytest.mark.parametrize(
    "kind, text, says",
    [
        ("helm", "image: nginx:1.25\n", "`image` must be a mapping"),
        ("kustomize", "images: {name: x}\n", "`images` must be a list"),
        ("helm", "- a\n- b\n", "must hold a YAML mapping"),
        ("helm", "a: [\n", "not valid YAML"),
    ],
)
def test_a_file_of_the_wrong_shape_is_refused_saying_why(kind, text, says):
    """An environment file faas-ci cannot edit fails the promotion (never retried)."""
    with pytest.raises(gitops.PromotionFailed, match=says) as e:
        gitops.edit(text, kind, IMAGE, "svc")
    assert e.value.reason == "promotion"


def test_an_image_not_named_by_digest_is_not_promoted():
    """Only repository@sha256:… is promoted: a tag can move, a digest cannot."""
    with pytest.raises(gitops.PromotionFailed, match="not named by digest"):
        gitops.edit(HELM, "helm", "registry/svc:latest", "svc")


def test_the_target_may_not_be_reached_through_a_symlink(tmp_path):
    """A file (or a folder on its way) that is a symbolic link is refused: it could point
    out of the clone; a missing file is refused too."""
    (tmp_path / "outside.yaml").write_text("a: 1\n")
    clone = tmp_path / "clone"
    (clone / "real").mkdir(parents=True)
    (clone / "real" / "values.yaml").write_text("a: 1\n")
    (clone / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    (clone / "dir").symlink_to(tmp_path)
    assert gitops.target_path(clone, "real/values.yaml") == clone / "real" / "values.yaml"
    for rel in ("link.yaml", "dir/outside.yaml"):
        with pytest.raises(gitops.PromotionFailed, match="symbolic link"):
            gitops.target_path(clone, rel)
    with pytest.raises(gitops.PromotionFailed, match="does not exist"):
        gitops.target_path(clone, "real/missing.yaml")


def test_credentials_in_the_repository_url_are_never_shown():
    """https://user:token@host/… is recorded and logged without the token."""
    url = "https://bot:s3cr3t@git.example/envs.git"
    assert gitops.display_url(url) == "https://git.example/envs.git"
    assert "s3cr3t" not in gitops._scrub(f"fatal: unable to access '{url}'", url)


def _run() -> runs.Run:
    return runs.new_run(pipeline.parse(PIPELINE, "x"), repo="/r", ref="v1.2.0", commit="c" * 40,
                        source="/r")  # fmt: skip


def test_an_approval_needs_a_request_and_is_given_once():
    """approve() refuses a run that waits for none (409), records who approved once asked,
    refuses a second approval and a finished run; a repeated request keeps the approval."""
    run = _run()
    with pytest.raises(Conflict, match="not waiting for an approval"):
        gitops.approve(run, "user:alice")
    asked = gitops.request_approval(run, "production")
    assert asked.by is None and asked.requested_at <= datetime.now(UTC)
    given = gitops.approve(run, "user:alice")
    assert (given.by, run.approval.by) == ("user:alice", "user:alice") and given.at
    assert gitops.request_approval(run, "production").by == "user:alice"  # a retry: kept
    with pytest.raises(Conflict, match="already approved by user:alice"):
        gitops.approve(run, "user:bob")
    run.status = "failed"
    with pytest.raises(Conflict, match="already failed"):
        gitops.approve(run, "user:bob")


def test_the_approval_is_kept_on_the_run_record():
    """Run.approval survives the record's JSON round trip (how the store keeps it)."""
    run = _run()
    gitops.request_approval(run, "production")
    gitops.approve(run, "user:alice")
    again = runs.Run.model_validate_json(run.model_dump_json())
    assert again.approval.by == "user:alice" and again.approval.environment == "production"


def test_a_ref_matching_no_environment_promotes_nothing_and_says_so():
    """A run of a feature branch passes its promote stage with `environment` None and a line
    saying why; so does a snapshot of uncommitted work; a matching run without an image
    fails as `promotion`."""
    stage_spec = pipeline.parse(PIPELINE, "x").stages["promote"].gitops
    run, lines = _run(), []
    run.ref = "feature/x"
    done = gitops.run_promotion(run, stage_spec, 5, lines.append, threading.Event())
    assert done.environment is None and done.commit is None
    assert done.repository == "git://127.0.0.1:9418/envs.git"
    assert lines == ["ref feature/x matches no environment of git://127.0.0.1:9418/envs.git "
                     "(staging, production); nothing promoted"]  # fmt: skip
    run.ref, run.snapshot = "main", True
    done = gitops.run_promotion(run, stage_spec, 5, lines.append, threading.Event())
    assert done.environment is None and "snapshot" in lines[-1]
    run.snapshot = False
    with pytest.raises(gitops.PromotionFailed, match="no build stage of this run pushed") as e:
        gitops.run_promotion(run, stage_spec, 5, lines.append, threading.Event())
    assert e.value.reason == "promotion"
