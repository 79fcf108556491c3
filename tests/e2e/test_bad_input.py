"""Bad input gets a 4xx JSON error naming the problem; nothing runs and nothing dies."""

import pytest
from conftest import ROOT

from faasci import STAGES
from faasci import stack as stack_file


def pids(gateway) -> dict:
    listed = gateway.session.get(f"{gateway.url}/system/functions").json()
    return {f["name"]: (f["pid"], f["restarts"]) for f in listed}


def run_count(gateway) -> int:
    return len(gateway.call("runs", method="GET", query={"limit": 500}).json()["runs"])


@pytest.fixture
def unharmed(gateway):
    """Asserts afterwards that no function process died and no run was created."""
    before, runs_before = pids(gateway), run_count(gateway)
    yield
    assert pids(gateway) == before
    assert run_count(gateway) == runs_before


def assert_error(resp, status: int, *words: str, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    for word in words:
        assert word in body["error"], body
    if field:
        assert body["field"] == field
    return body


@pytest.mark.parametrize("function", [*STAGES, "runs"])
def test_malformed_json(gateway, unharmed, function):
    """A body that is not JSON gets 400 naming the body."""
    resp = gateway.call(
        function, b'{"repo": "/tmp/x",', headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 400, "not valid JSON", field="body")


def test_malformed_json_in_a_signed_push(webhook, unharmed):
    """The webhook reads a body only once its signature checks out; then bad JSON is 400."""
    assert_error(webhook(b'{"repo": "/tmp/x",'), 400, "not valid JSON", field="body")


def test_json_that_is_not_an_object(gateway, unharmed):
    """A JSON list or string is refused with 400."""
    assert_error(gateway.call("unit", b"[1, 2]"), 400, "JSON object", field="body")


def test_unknown_function(gateway, unharmed):
    """An unknown function gets 404 from the gateway, sync and async."""
    assert_error(gateway.call("no-such-fn", {}), 404, "no-such-fn", field="function")
    resp = gateway.session.post(f"{gateway.url}/async-function/no-such-fn", data=b"{}")
    assert_error(resp, 404, "no-such-fn", field="function")


def test_missing_repository_path(gateway, unharmed, tmp_path):
    """A path that does not exist gets 422 naming repo."""
    resp = gateway.call("lint", {"repo": str(tmp_path / "nowhere")})
    assert_error(resp, 422, "does not exist", field="repo")


def test_folder_that_is_not_a_repository(gateway, unharmed, tmp_path):
    """A folder outside any git repository gets 422 naming repo."""
    assert_error(
        gateway.call("lint", {"repo": str(tmp_path)}), 422, "not inside a git", field="repo"
    )


def test_unreachable_repository_url(gateway, unharmed):
    """A git URL that cannot be read (nothing listens there) gets 422 naming repo."""
    resp = gateway.call("unit", {"repo": "http://127.0.0.1:9/nothing.git", "ref": "main"})
    assert_error(resp, 422, "cannot read repository", field="repo")


def test_relative_path_and_missing_repo(gateway, unharmed):
    """A relative path, or no repo at all, gets 400 naming repo."""
    assert_error(gateway.call("unit", {"repo": "examples/sample-service"}), 400, "absolute",
                 field="repo")  # fmt: skip
    assert_error(gateway.call("unit", {"ref": "main"}), 400, "repo", field="repo")


@pytest.mark.parametrize("ref", ["--upload-pack=touch {marker}", "main/../../etc", "a..b", "-x"])
def test_option_or_escape_refs_are_refused(gateway, unharmed, sample_repo, tmp_path, ref):
    """Refs that git could read as an option or a path escape get 400; nothing runs."""
    marker = tmp_path / "pwned"
    resp = gateway.call("lint", {"repo": str(sample_repo), "ref": ref.format(marker=marker)})
    assert_error(resp, 400, "not a valid", field="ref")
    assert not marker.exists()


def test_unknown_ref(gateway, unharmed, sample_repo):
    """A well-formed ref that the repository lacks gets 422 naming ref."""
    resp = gateway.call("lint", {"repo": str(sample_repo), "ref": "no-such-branch"})
    assert_error(resp, 422, "not found", field="ref")


def test_pipeline_file_with_a_wrong_type(gateway, unharmed, make_repo, tmp_path):
    """A pipeline file whose timeout is not a number gets 422 naming the field; no command runs."""
    marker = tmp_path / "ran"
    repo = make_repo({
        ".faasci.yml": f"service: x\nstages:\n  lint:\n    run: ['touch {marker}']\n"
                       "    timeout: soon\n",
    })  # fmt: skip
    resp = gateway.call("lint", {"repo": str(repo)})
    assert_error(resp, 422, "stages.lint.timeout", field="stages.lint.timeout")
    resp = gateway.call("runs", {"repo": str(repo)})
    assert_error(resp, 422, "stages.lint.timeout", field="stages.lint.timeout")
    assert not marker.exists()


def test_body_over_the_limit(gateway, unharmed, sample_repo):
    """A body over 256,000 bytes gets 413, sync and async."""
    big = {"repo": str(sample_repo), "pad": "x" * 256_001}
    assert_error(gateway.call("lint", big), 413, "256000", field="body")
    resp = gateway.session.post(f"{gateway.url}/async-function/lint", json=big)
    assert_error(resp, 413, "256000", field="body")


def test_bad_run_id_and_attempt(gateway, unharmed):
    """A malformed run id gets 400, an unknown one 404, a bad attempt 400."""
    assert_error(gateway.call("unit", {"run_id": "../../x"}), 400, "not a run id", field="run_id")
    assert_error(gateway.call("unit", {"run_id": "20260101-000000-abcdef"}), 404, "no run",
                 field="run_id")  # fmt: skip
    resp = gateway.call("unit", {"run_id": "20260101-000000-abcdef", "attempt": "one"})
    assert_error(resp, 400, "attempt", field="attempt")


def test_bad_callback_url(gateway, unharmed):
    """A malformed X-Callback-Url gets 400 at the gateway."""
    resp = gateway.session.post(f"{gateway.url}/async-function/lint", data=b"{}",
                                headers={"X-Callback-Url": "not a url"})  # fmt: skip
    assert_error(resp, 400, "X-Callback-Url", field="X-Callback-Url")


FUNCTIONS = sorted(stack_file.load(ROOT / "stack.yml").functions)  # every one, new ones too


@pytest.mark.parametrize("function", FUNCTIONS)
def test_deeply_nested_json(gateway, unharmed, function):
    """100,000 nested `[` (or `{"a":`) get 400 naming the body from every function, those
    that never parse a body too, on any path and method; 64 levels are still JSON."""
    for body in (b"[" * 100_000, b'{"a":' * 50_000, b"[" * 65 + b"]" * 65):
        for method, path in (("POST", ""), ("GET", ""), ("POST", "purge"), ("GET", "x/y/1")):
            resp = gateway.call(function, body, method=method, path=path,
                                headers={"Content-Type": "application/json"})  # fmt: skip
            assert_error(resp, 400, "deeper than 64", field="body")
    resp = gateway.call(function, b"[" * 64 + b"]" * 64)
    assert resp.status_code != 400 or "deeper" not in resp.text
