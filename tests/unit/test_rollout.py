"""The deploy stage's targets in the pipeline file (faasci.rollout's models, checked by
faasci.pipeline), and the rollout's pure parts: credentials, the revision to sync, the
deployment that puts a function back."""

from types import SimpleNamespace

import pytest

from faasci import pipeline, rollout
from faasci.errors import Unprocessable


def parse(stages: str):
    return pipeline.parse(f"service: svc\nstages:\n{stages}", "svc")


def refused(stages: str) -> Unprocessable:
    with pytest.raises(Unprocessable) as e:
        parse(stages)
    return e.value


def test_an_openfaas_target_takes_its_defaults():
    """Only the function is required: smoke path /, 120 s, rollback on, the stack's gateway."""
    spec = parse("  deploy:\n    openfaas: {function: inventory}\n").stages["deploy"]
    target = spec.openfaas
    assert (target.function, target.path, target.timeout, target.rollback) == (
        "inventory", "/", 120, True)  # fmt: skip
    assert target.gateway is None and target.env == {} and spec.argocd is None
    assert spec.run == []  # a deploy stage with a target needs no commands


def test_an_openfaas_target_keeps_what_the_file_says():
    """gateway, path, timeout, rollback and env (scalars as strings) as written."""
    target = (
        parse(
            "  deploy:\n    openfaas: {function: inv, gateway: 'http://gw:8080', path: /health,"
            " timeout: 30, rollback: false, env: {WORKERS: 2, DEBUG: true}}\n"
        )
        .stages["deploy"]
        .openfaas
    )
    assert target.gateway == "http://gw:8080" and target.path == "/health"
    assert target.timeout == 30 and target.rollback is False
    assert target.env == {"WORKERS": "2", "DEBUG": "true"}


@pytest.mark.parametrize(
    "target, field",
    [
        ("{function: Not_A_Name}", "stages.deploy.openfaas.function"),
        ("{function: inv, path: health}", "stages.deploy.openfaas.path"),
        ("{function: inv, timeout: 0}", "stages.deploy.openfaas.timeout"),
        ("{function: inv, timeout: true}", "stages.deploy.openfaas.timeout"),
        ("{function: inv, gateway: 'ftp://x'}", "stages.deploy.openfaas.gateway"),
        ("{function: inv, replicas: 3}", "stages.deploy.openfaas.replicas"),
        ("{function: inv, env: {'1X': a}}", "stages.deploy.openfaas.env.1X.[key]"),
        ("{}", "stages.deploy.openfaas.function"),
        ("{function: runs}", "stages.deploy.openfaas.function"),  # faas-ci's own function
        ("{function: deploy}", "stages.deploy.openfaas.function"),
    ],
)
def test_a_bad_openfaas_target_is_refused_naming_the_field(target, field):
    """Each mistake is a 422 naming the field it is in."""
    error = refused(f"  deploy:\n    openfaas: {target}\n")
    assert error.status == 422 and error.field == field, error.message


def test_one_target_only_and_only_on_the_deploy_stage():
    """Both targets at once, or a target on another stage, are refused with the reason."""
    argocd = "    argocd: {server: 'https://argo', application: a, token_file: /t}\n"
    both = refused("  deploy:\n    openfaas: {function: a}\n" + argocd)
    assert "exactly one target" in both.message and both.field == "stages"
    elsewhere = refused("  unit:\n    run: ['true']\n    openfaas: {function: a}\n")
    assert "unit.openfaas: only the deploy stage rolls out" in elsewhere.message


def test_a_deploy_stage_needs_commands_or_a_target():
    """Without either it is refused, and the message names the targets."""
    error = refused("  deploy: {timeout: 60}\n")
    assert error.field == "stages.deploy.run" and "`openfaas` or `argocd`" in error.message


def test_an_argocd_target_names_its_token_exactly_once():
    """token_secret (a declared stage secret) or token_file; neither, both, or a secret the
    stage does not declare is refused."""
    ok = parse("  deploy:\n    secrets: {ARGO_TOKEN: argocd#token}\n"
               "    argocd: {server: 'https://argo.example.com', application: inventory,"
               " token_secret: ARGO_TOKEN}\n").stages["deploy"].argocd  # fmt: skip
    assert ok.timeout == 300 and ok.prune is False and ok.token_file is None
    neither = refused("  deploy:\n    argocd: {server: 'https://a', application: x}\n")
    assert neither.field == "stages.deploy.argocd" and "exactly one of" in neither.message
    both = refused("  deploy:\n    argocd: {server: 'https://a', application: x,"
                   " token_file: /t, token_secret: T}\n")  # fmt: skip
    assert "exactly one of" in both.message
    undeclared = refused("  deploy:\n    argocd: {server: 'https://a', application: x,"
                         " token_secret: ARGO_TOKEN}\n")  # fmt: skip
    assert "'ARGO_TOKEN' is not one of the stage's secrets" in undeclared.message


def test_gateway_credentials_come_from_the_functions_secrets():
    """openfaas-password (user openfaas-user, else admin); without it a clear `secrets`
    failure naming the secret to create."""
    given = {"openfaas-password": "pw"}
    assert rollout.gateway_credentials(given.get) == ("admin", "pw")
    assert rollout.gateway_credentials({**given, "openfaas-user": "ops"}.get) == ("ops", "pw")
    with pytest.raises(rollout.Failed) as e:
        rollout.gateway_credentials({}.get)
    assert e.value.reason == "secrets" and "openfaas-password" in str(e.value)


def test_the_revision_synced_is_the_promoted_commit_else_head():
    """The last passed promote attempt's promotion.commit; HEAD when none recorded one."""

    def run_with(*attempts):
        stages = {"promote": SimpleNamespace(attempts=list(attempts))}
        return SimpleNamespace(stage=lambda name: stages[name])

    passed = SimpleNamespace(status="passed", promotion={"commit": "c0ffee" * 6 + "abcd"})
    unchanged = SimpleNamespace(status="passed", promotion={"commit": None})
    failed = SimpleNamespace(status="failed", promotion={"commit": "f" * 40})
    assert rollout.promoted_revision(run_with(failed, passed)) == passed.promotion["commit"]
    assert rollout.promoted_revision(run_with(unchanged)) == "HEAD"
    assert rollout.promoted_revision(run_with(failed)) == "HEAD"
    no_promote = SimpleNamespace(stage=lambda name: (_ for _ in ()).throw(KeyError(name)))
    assert rollout.promoted_revision(no_promote) == "HEAD"


def test_a_rollback_puts_the_function_back_as_its_status_described_it():
    """The FunctionDeployment made from a FunctionStatus keeps its image, environment,
    secrets, labels and limits, and leaves out what a status only reports."""
    status = {
        "name": "inv", "image": "r/inv@sha256:" + "1" * 64, "namespace": "openfaas-fn",
        "envProcess": "", "envVars": {"A": "1"}, "secrets": ["db"], "labels": {"l": "v"},
        "annotations": {}, "limits": {"memory": "128Mi"}, "requests": None,
        "replicas": 1, "availableReplicas": 0, "invocationCount": 4, "pid": 12,
    }  # fmt: skip
    assert rollout._body_of(status) == {
        "service": "inv", "image": status["image"], "envVars": {"A": "1"}, "secrets": ["db"],
        "labels": {"l": "v"}, "limits": {"memory": "128Mi"},
    }  # fmt: skip


def test_the_deployment_record_has_every_field():
    """What the deploy attempt records: the same keys for either target."""
    record = rollout.to_record(
        rollout.Result(deployment=rollout.Deployment(target="openfaas", function="f", image="i"))
    )["deployment"]
    assert set(record) == {"target", "function", "application", "image", "revision",
                           "previous", "rolled_back_to", "healthy_after_s"}  # fmt: skip
    assert record["target"] == "openfaas" and record["rolled_back_to"] is None


def test_another_gateways_password_is_one_of_the_stages_secrets():
    """password_secret must name a secret the stage declares; then it parses."""
    error = refused("  deploy:\n    openfaas: {function: inv, gateway: 'http://gw:8080', "
                    "password_secret: GW_PASSWORD}\n")  # fmt: skip
    assert error.field == "stages" and "password_secret" in error.message
    spec = parse("  deploy:\n    openfaas: {function: inv, gateway: 'http://gw:8080', "
                 "password_secret: GW_PASSWORD}\n    secrets: {GW_PASSWORD: 'gw#password'}\n"
                 ).stages["deploy"]  # fmt: skip
    assert spec.openfaas.password_secret == "GW_PASSWORD" and spec.openfaas.user == "admin"


def test_the_platforms_credentials_never_go_to_another_gateway(tmp_path):
    """A target naming a gateway that is not the platform's, without its own password, fails
    as `secrets` before any request is made (one to the closed port would be `infra`)."""
    from faasci import settings

    read = []
    spec = parse("  deploy:\n    openfaas: {function: inv, gateway: 'http://127.0.0.1:9'}\n"
                 ).stages["deploy"]  # fmt: skip
    run = SimpleNamespace(image="r/inv@sha256:" + "a" * 64)
    saved = settings.settings()
    settings.configure(settings.Settings(gateway_url="http://127.0.0.1:8080",
                                         secrets_dir=tmp_path))  # fmt: skip
    try:
        with (tmp_path / "log").open("wb") as out:
            done = rollout.deploy(run, spec, out, None, lambda: read.append(1) or {})
    finally:
        settings.configure(saved)
    assert done.reason == "secrets" and "not the platform's gateway" in done.error
    assert read == []
    assert "not the platform's gateway" in (tmp_path / "log").read_text()
