"""faasci.stack: reading stack.yml as faas-cli does."""

from pathlib import Path

import pytest
import yaml

from faasci import FUNCTIONS, STAGES, stack

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "stack.yml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(STACK.read_text())


# The local stack's addresses: stack.yml's defaults when faas-cli's environment sets none.
LOCAL_DEFAULTS = {
    "GATEWAY_URL": "http://127.0.0.1:8080",
    "PUBLIC_URL": "http://127.0.0.1:8080",
    "NATS_URL": "nats://127.0.0.1:4222",
    "S3_ENDPOINT": "http://127.0.0.1:8333",
    "FAASCI_REGISTRY": "127.0.0.1:5000",
}


@pytest.fixture(scope="module")
def loaded() -> stack.Stack:
    return stack.load(STACK, env={})


def test_every_function_is_loaded(loaded, raw):
    """Every function in stack.yml is there, and they are faasci.FUNCTIONS (the names a
    deploy stage may not take)."""
    assert set(loaded.functions) == set(raw["functions"]) == set(FUNCTIONS)
    assert set(STAGES) | {"webhook", "runs", "pipeline-log"} <= set(loaded.functions)
    assert loaded.gateway == "http://127.0.0.1:8080"
    assert loaded.gateway_port == 8080
    assert loaded.path == STACK


def test_every_handler_folder_exists(loaded):
    """Each function's handler is an absolute, existing folder with a handler.py."""
    for name, fn in loaded.functions.items():
        assert fn.name == name
        assert fn.handler.is_absolute()
        assert fn.handler.is_dir(), fn.handler
        assert (fn.handler / "handler.py").is_file(), name


def test_images_use_their_defaults_without_variables(loaded):
    """With no REGISTRY or TAG set, images name the local registry."""
    assert loaded.functions["webhook"].image == "localhost:5000/faasci/webhook:0.1.0"
    assert loaded.functions["unit"].image == "localhost:5000/faasci/unit:0.1.0"


def test_images_use_the_variables_when_set():
    """REGISTRY and TAG replace the defaults everywhere."""
    loaded = stack.load(STACK, env={"REGISTRY": "registry.local:5000/ci", "TAG": "dev"})
    for name, fn in loaded.functions.items():
        assert fn.image == f"registry.local:5000/ci/{name}:dev"


def test_every_function_gets_the_local_addresses_by_default(loaded):
    """Without variables, every function points at the local stack's servers."""
    for name, fn in loaded.functions.items():
        for key, value in LOCAL_DEFAULTS.items():
            assert fn.environment[key] == value, (name, key)
        assert fn.environment["S3_BUCKET"] == "faasci"


def test_a_cluster_sets_every_address_through_the_environment():
    """PUBLIC_URL, NATS_URL, S3_ENDPOINT, GATEWAY_URL and REGISTRY come from faas-cli's env."""
    cluster = {
        "GATEWAY_URL": "http://gateway.openfaas:8080",
        "PUBLIC_URL": "https://ci.example.com",
        "NATS_URL": "nats://nats.openfaas:4222",
        "S3_ENDPOINT": "https://s3.example.com",
        "FAASCI_REGISTRY": "registry.example.com/apps",
    }
    loaded = stack.load(STACK, env={**cluster, "REGISTRY": "reg.example.com/ci"})
    for name, fn in loaded.functions.items():
        assert {k: fn.environment[k] for k in cluster} == cluster, name
        assert fn.image.startswith("reg.example.com/ci/"), name


def test_function_environment_is_added_to_the_shared_one(loaded):
    """The webhook's own SCHEDULED_REPOS sits next to the shared settings."""
    env = loaded.functions["webhook"].environment
    assert env["SCHEDULED_REPOS"] == ""
    assert env["NATS_URL"] == LOCAL_DEFAULTS["NATS_URL"]
    assert "SCHEDULED_REPOS" not in loaded.functions["unit"].environment


def seconds(duration: str) -> float:
    """A Go duration of the forms stack.yml uses (6h15m, 5m, 30s) in seconds."""
    import re

    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([hms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_every_function_has_watchdog_limits_sized_for_its_work(loaded):
    """exec/read/write timeouts and max_inflight everywhere; a stage outlasts its longest
    allowed pipeline timeout, and no answer is cut by write_timeout before exec_timeout."""
    from faasci.pipeline import StageSpec

    longest_stage = StageSpec.model_fields["timeout"].metadata
    limit = next(m.le for m in longest_stage if hasattr(m, "le"))
    for name, fn in loaded.functions.items():
        env = fn.environment
        assert int(env["max_inflight"]) >= 1, name
        assert seconds(env["write_timeout"]) >= seconds(env["exec_timeout"]), name
        assert seconds(env["read_timeout"]) >= 10, name
    for name in STAGES:
        assert seconds(loaded.functions[name].environment["exec_timeout"]) > limit, name


def test_variables_reach_the_function_environment():
    """${VAR:-default} in a function's own environment takes the variable when set."""
    loaded = stack.load(STACK, env={"SCHEDULED_REPOS": "https://x/r.git#main"})
    assert loaded.functions["webhook"].environment["SCHEDULED_REPOS"] == "https://x/r.git#main"


def test_variables_that_yaml_would_retype_reach_functions_as_written():
    """A value YAML reads as something else (`off` a boolean, a JSON object a mapping)
    reaches every function as the text that was set: stack.yml quotes them."""
    card = '{"currency": "EUR", "cpu_second": 0.00003}'
    loaded = stack.load(STACK, env={"FAASCI_CAP_SCOPE": "off", "FAASCI_RATE_CARD": card})
    for name, fn in loaded.functions.items():
        assert fn.environment["FAASCI_CAP_SCOPE"] == "off", name
        assert fn.environment["FAASCI_RATE_CARD"] == card, name


def test_secrets_labels_and_schedule(loaded):
    """Secrets, labels (through YAML anchors) and the webhook's cron schedule are read."""
    webhook = loaded.functions["webhook"]
    # The webhook secret is Vault's (faasci.vault.platform_secret), not a file secret.
    platform = ["nats-token", "s3-access-key", "s3-secret-key", "vault-role-id", "vault-secret-id"]
    assert webhook.secrets == platform
    assert webhook.labels["com.openfaas.scale.zero"] == "false"
    assert webhook.annotations["topic"] == "cron-function"
    assert webhook.schedule == "0 2 * * *"
    for name in STAGES:
        fn = loaded.functions[name]
        # The deploy stage also calls the gateway's API (faasci.rollout).
        assert fn.secrets == platform + (["openfaas-password"] if name == "deploy" else [])
        assert fn.labels["com.openfaas.scale.max"] == "10"
        assert fn.labels["com.openfaas.scale.zero"] == "false"
        assert fn.schedule is None
    assert loaded.functions["runs"].schedule is None
    rotation = loaded.functions["secrets"]
    assert rotation.schedule == rotation.environment["FAASCI_SCHEDULE"] == "0 4 */2 * *"
    assert {"vault-admin-role-id", "vault-admin-secret-id"} <= set(rotation.secrets)


def test_environment_files_win_and_are_not_substituted(tmp_path):
    """As faas-cli: environment_file keys override the function's own; files are plain YAML."""
    (tmp_path / "fn").mkdir()
    (tmp_path / "shared.yml").write_text(
        "environment:\n  LOG_LEVEL: INFO\n  ONLY_SHARED: yes-shared\n  PORT: 8080\n"
        "  LITERAL: ${NOT_SUBSTITUTED:-x}\n"
    )
    (tmp_path / "later.yml").write_text("environment:\n  ONLY_SHARED: from-later-file\n")
    (tmp_path / "stack.yml").write_text(
        "provider: {name: openfaas, gateway: 'http://127.0.0.1:31112'}\n"
        "functions:\n"
        "  fn:\n"
        "    handler: ./fn\n"
        "    environment_file: [shared.yml, later.yml]\n"
        "    environment: {LOG_LEVEL: DEBUG, OWN: '${OWN_VAR:-own-default}', EMPTY: null}\n"
        "    annotations: {topic: other, schedule: '* * * * *'}\n"
    )
    loaded = stack.load(tmp_path / "stack.yml", env={"NOT_SUBSTITUTED": "no"})
    fn = loaded.functions["fn"]
    assert fn.environment == {
        "LOG_LEVEL": "INFO",
        "ONLY_SHARED": "from-later-file",
        "PORT": "8080",
        "LITERAL": "${NOT_SUBSTITUTED:-x}",
        "OWN": "own-default",
        "EMPTY": "",
    }
    assert fn.handler == (tmp_path / "fn").resolve()
    assert fn.secrets == [] and fn.labels == {} and fn.image == ""
    assert fn.schedule is None  # a schedule only counts with topic: cron-function
    assert loaded.gateway_port == 31112


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${REGISTRY:-ghcr.io/x}/app", {}, "ghcr.io/x/app"),
        ("${REGISTRY:-ghcr.io/x}/app", {"REGISTRY": "reg.local"}, "reg.local/app"),
        ("${REGISTRY:-ghcr.io/x}/app", {"REGISTRY": ""}, "ghcr.io/x/app"),
        ("${URL:-http://h:8080/p}", {}, "http://h:8080/p"),
        ("${EMPTY:-}", {}, ""),
        ("${PLAIN}", {}, ""),
        ("${PLAIN}", {"PLAIN": "v"}, "v"),
        ("a ${A:-1} b ${B:-2}", {"B": "two"}, "a 1 b two"),
        ("$NOT_BRACED stays", {"NOT_BRACED": "x"}, "$NOT_BRACED stays"),
    ],
)
def test_substitute(text, env, expected):
    """${VAR:-default} takes VAR when set and non-empty, else the default (as faas-cli)."""
    assert stack.substitute(text, env) == expected


def test_load_reads_the_process_environment_by_default(monkeypatch):
    """Without an explicit env, load substitutes from os.environ."""
    monkeypatch.setenv("TAG", "from-os-environ")
    monkeypatch.delenv("REGISTRY", raising=False)
    loaded = stack.load(STACK)
    assert loaded.functions["runs"].image == "localhost:5000/faasci/runs:from-os-environ"


def test_deployment_fields_are_what_faas_cli_sends(loaded):
    """The template's fprocess (faas-cli's envProcess), limits and requests are read, so
    the local gateway can tell an unchanged `faas-cli deploy` from a changed one."""
    unit, runs = loaded.functions["unit"], loaded.functions["runs"]
    assert unit.env_process == runs.env_process == "python index.py"
    assert unit.limits == {"memory": "1Gi", "cpu": "1"}
    assert unit.requests == {"memory": "256Mi", "cpu": "100m"}
    assert runs.limits == runs.requests == {} and runs.constraints == []
    assert unit.read_only_root_filesystem and not runs.read_only_root_filesystem
