"""The build stage's image: where it goes and what it may build, before any engine is asked
(faasci.images)."""

import io
import threading

import pytest

from faasci import images, settings
from faasci.pipeline import DockerBuild


def test_the_repository_is_the_registry_and_the_service_unless_named(monkeypatch):
    monkeypatch.setenv("FAASCI_REGISTRY", "registry.example:5000/team/")
    settings.configure(settings.Settings.from_env())
    try:
        assert images.repository_for("Inventory", DockerBuild()) == (
            "registry.example:5000/team/inventory")  # fmt: skip
        named = DockerBuild(repository="ghcr.io/acme/inventory")
        assert images.repository_for("inventory", named) == "ghcr.io/acme/inventory"
    finally:
        settings.configure(None)


@pytest.mark.parametrize(("spec", "what"), [
    (DockerBuild(file="missing/Dockerfile"), "docker.file 'missing/Dockerfile'"),
    (DockerBuild(context="nowhere"), "docker.context 'nowhere'"),
    (DockerBuild(file="link/Dockerfile"), "docker.file 'link/Dockerfile'"),  # out by a link
])  # fmt: skip
def test_a_dockerfile_or_context_outside_the_commit_is_the_projects_error(tmp_path, spec, what):
    service = tmp_path / "repo" / "svc"
    service.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "Dockerfile").write_text("FROM scratch\n")
    (service / "link").symlink_to(tmp_path / "elsewhere")
    out = io.BytesIO()
    with pytest.raises(images.BuildFailed) as failed:
        images.build_and_push(spec, service, "r/svc", "abc", out, 60, threading.Event())
    assert failed.value.reason == "exit" and what in str(failed.value)


def test_pushed_names_the_image_by_digest():
    pushed = images.Pushed("127.0.0.1:5000/svc", "abc123", "sha256:" + "0" * 64)
    assert pushed.ref == "127.0.0.1:5000/svc@sha256:" + "0" * 64
