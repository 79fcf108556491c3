"""The `.faasci.yml` model: parsing, validation errors that name the field, defaults."""

import pytest

from faasci import STAGES, pipeline
from faasci.errors import Unprocessable, UserError

VALID = """\
service: inventory
env:
  APP_ENV: ci
  DEBUG: true
  WORKERS: 4
stages:
  deploy:
    run: ["sh scripts/deploy.sh"]
  unit:
    run: ["python -m pytest -q"]
    timeout: 300
    retries: 1
    retry_on: [exit, timeout]
  lint:
    run: ["ruff check ."]
  build:
    run: ["make image"]
"""


def parse_error(text: str) -> Unprocessable:
    with pytest.raises(Unprocessable) as caught:
        pipeline.parse(text, "svc")
    return caught.value


def test_valid_file_parses_in_canonical_stage_order():
    """Stages come out in faasci.STAGES order, whatever order the file lists them in."""
    p = pipeline.parse(VALID, "ignored-default")
    assert p.service == "inventory"
    assert p.stage_names() == ["lint", "unit", "build", "deploy"]
    assert p.stage_names() == [s for s in STAGES if s in p.stage_names()]
    unit = p.stages["unit"]
    assert (unit.run, unit.timeout, unit.retries, unit.retry_on) == (
        ["python -m pytest -q"],
        300,
        1,
        ["exit", "timeout"],
    )


def test_defaults_for_retries_retry_on_and_timeout():
    """A stage naming only `run` gets 3 retries on timeout/infra and a 600 s timeout."""
    p = pipeline.parse("stages:\n  lint:\n    run: [ruff check .]\n", "svc")
    lint = p.stages["lint"]
    assert lint.retries == 3
    assert lint.retry_on == ["timeout", "infra"]
    assert lint.timeout == 600


def test_service_defaults_to_the_given_name():
    """Without `service:` the caller's default name is used."""
    assert pipeline.parse("stages: {unit: {run: [pytest]}}", "my-svc").service == "my-svc"


def test_run_as_a_single_string_becomes_a_one_command_list():
    """`run: pytest` is the same as `run: [pytest]`."""
    p = pipeline.parse("stages:\n  unit:\n    run: python -m pytest -q\n", "svc")
    assert p.stages["unit"].run == ["python -m pytest -q"]


def test_unknown_extra_keys_are_kept():
    """Unknown keys at the top and in a stage survive parsing and dumping."""
    text = "notify: {slack: '#ci'}\nstages:\n  unit:\n    run: [pytest]\n    artifacts: [dist]\n"
    p = pipeline.parse(text, "svc")
    dumped = p.model_dump()
    assert dumped["notify"] == {"slack": "#ci"}
    assert dumped["stages"]["unit"]["artifacts"] == ["dist"]
    assert p.stages["unit"].run == ["pytest"]


def test_env_values_become_strings():
    """env values become strings, booleans as lowercase true/false."""
    env = pipeline.parse(VALID, "svc").env
    assert env == {"APP_ENV": "ci", "DEBUG": "true", "WORKERS": "4"}


def test_bad_timeout_names_the_stage_field():
    """`timeout: "soon"` is a 422 naming stages.unit.timeout."""
    e = parse_error("stages:\n  unit:\n    run: [pytest]\n    timeout: soon\n")
    assert isinstance(e, UserError) and e.status == 422
    assert e.field == "stages.unit.timeout"
    assert "stages.unit.timeout" in e.message
    assert e.body() == {"error": e.message, "field": "stages.unit.timeout"}


@pytest.mark.parametrize(
    ("stage_yaml", "field"),
    [
        ("unit: {run: [pytest], retries: 11}", "stages.unit.retries"),
        ("unit: {run: [pytest], timeout: 0}", "stages.unit.timeout"),
        ("unit: {run: [pytest], retry_on: [exit, sometimes]}", "stages.unit.retry_on.1"),
        ("unit: {run: []}", "stages.unit.run"),
        ("unit: {run: ['']}", "stages.unit.run.0"),
        ("unit: {timeout: 10}", "stages.unit.run"),
    ],
)
def test_bad_stage_values_name_their_field(stage_yaml, field):
    """Each invalid stage value is a 422 whose field is its dotted path."""
    e = parse_error(f"stages:\n  {stage_yaml}\n")
    assert e.status == 422
    assert e.field == field


def test_unknown_stage_names_stages_and_the_stage():
    """An unknown stage is refused, naming `stages`, the stage and the valid names."""
    e = parse_error("stages:\n  test:\n    run: [pytest]\n")
    assert e.status == 422
    assert e.field == "stages"
    assert "'test'" in e.message
    assert "lint, unit, build, integration, promote, deploy" in e.message


def test_missing_stages_names_stages():
    """A file without stages is a 422 naming `stages`."""
    e = parse_error("service: svc\n")
    assert e.field == "stages"


def test_empty_file_is_missing_stages_not_a_crash():
    """An empty file parses as an empty mapping and fails on `stages`."""
    assert parse_error("").field == "stages"


@pytest.mark.parametrize("text", ["- unit\n- lint\n", "just a string\n", "42\n"])
def test_non_mapping_file_is_refused(text):
    """A file that is not a mapping is a 422 naming the file."""
    e = parse_error(text)
    assert e.status == 422
    assert e.field == ".faasci.yml"
    assert "must be a mapping" in e.message


def test_invalid_yaml_gives_the_line_number():
    """A YAML syntax error is a 422 that says on which line."""
    e = parse_error("service: svc\nstages:\n  unit: run: pytest\n")
    assert e.status == 422
    assert e.field == ".faasci.yml"
    assert "not valid YAML at line 3" in e.message


def test_bad_env_var_name_is_refused():
    """An env name that is not a shell variable name is a 422 naming env and the name."""
    e = parse_error("env:\n  1BAD-NAME: x\nstages:\n  unit:\n    run: [pytest]\n")
    assert e.status == 422
    assert e.field == "env"
    assert "1BAD-NAME" in e.message


def test_non_scalar_env_value_names_the_variable():
    """A list as an env value is a 422 whose field is env.<NAME>, not a type name."""
    e = parse_error("env:\n  PATHS: [a, b]\nstages:\n  unit:\n    run: [pytest]\n")
    assert e.status == 422
    assert e.field == "env.PATHS"


def test_bad_service_name_names_service():
    """A service name with a space is a 422 naming `service`."""
    e = parse_error("service: my service\nstages: {unit: {run: [pytest]}}\n")
    assert e.field == "service"


def test_validate_takes_a_mapping():
    """`validate` checks an already loaded mapping the same way."""
    p = pipeline.validate({"service": "s", "stages": {"unit": {"run": "pytest"}}})
    assert p.stages["unit"].run == ["pytest"]
    with pytest.raises(Unprocessable) as caught:
        pipeline.validate({"service": "s", "stages": {"unit": {"run": "x", "retries": -1}}})
    assert caught.value.field == "stages.unit.retries"


@pytest.mark.parametrize("marker", ["pyproject.toml", "setup.py", "setup.cfg", "requirements.txt"])
def test_default_pipeline_for_a_python_project(marker):
    """A Python project without a pipeline file gets ruff (lint) and pytest (unit)."""
    p = pipeline.default({marker, "README.md"}, "py-svc")
    assert p.service == "py-svc"
    assert p.stage_names() == ["lint", "unit"]
    assert p.stages["lint"].run == ["ruff check ."]
    assert p.stages["unit"].run == ["python -m pytest -q"]


def test_default_pipeline_for_a_node_project():
    """A Node project gets `npm ci` + `npm run lint` and `npm ci` + `npm test`."""
    p = pipeline.default({"package.json", "index.js"}, "node-svc")
    assert p.stage_names() == ["lint", "unit"]
    assert p.stages["lint"].run == ["npm ci", "npm run lint"]
    assert p.stages["unit"].run == ["npm ci", "npm test"]
    assert p.stages["unit"].retries == 3


def test_default_pipeline_for_an_unrecognised_project_is_a_clear_error():
    """No pipeline file and no known project file: a 422 saying what was looked for."""
    with pytest.raises(Unprocessable) as caught:
        pipeline.default({"README.md", "main.go"}, "svc")
    e = caught.value
    assert e.status == 422
    assert e.field == ".faasci.yml"
    for name in ("pyproject.toml", "package.json", "no .faasci.yml"):
        assert name in e.message
