"""The `.faasci.yml` model: parsing, validation errors that name the field, and the default
pipeline of a repository without one (on the real projects of ../shared/corpus and on small
made-up ones), with `faasci run --explain`."""

import tempfile
import textwrap
from pathlib import Path

import pytest
from conftest import CORPUS_PROJECTS, corpus_repo

from faasci import STAGES, cli, defaults, git, pipeline
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
    """A stage naming only `run` gets 3 retries on exit/timeout/infra (a failing test is
    retried, as the seed says) and a 600 s timeout; a pipeline can narrow retry_on."""
    p = pipeline.parse("stages:\n  lint:\n    run: [ruff check .]\n", "svc")
    lint = p.stages["lint"]
    assert lint.retries == 3
    assert lint.retry_on == ["exit", "timeout", "infra"]
    assert lint.timeout == 600
    narrowed = pipeline.parse("stages: {lint: {run: [x], retry_on: [timeout, infra]}}\n", "s")
    assert narrowed.stages["lint"].retry_on == ["timeout", "infra"]


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
        ("build: {docker: {file: ../../etc/passwd}}", "stages.build.docker.file"),
        ("build: {docker: {context: /}}", "stages.build.docker.context"),
        ("build: {docker: {target: 'a b'}}", "stages.build.docker.target"),
        ("build: {docker: {repository: 'Upper/Case'}}", "stages.build.docker.repository"),
        ("build: {docker: {dockerfile: x}}", "stages.build.docker.dockerfile"),
        ("lint: {docker: {}, run: [x]}", "stages"),
        ("unit: {image: built, run: [x]}", "stages"),
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


@pytest.mark.parametrize(
    ("files", "name"),
    [({".faasci.yml": "[" * 100_000}, ".faasci.yml"),
     ({"package.json": "[" * 100_000}, "package.json"),
     ({"pyproject.toml": "a = " + "[" * 100_000}, "pyproject.toml")],
)  # fmt: skip
def test_endlessly_nested_repository_files_are_a_422(files, name):
    """A repository's file nesting 100,000 deep is a 422 naming it, not a RecursionError."""
    text = files.get(".faasci.yml")
    with pytest.raises(Unprocessable) as caught:
        pipeline.load(text, set(files), "svc", files.get)
    assert caught.value.field == name and "nests too deeply" in caught.value.message


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


# The default pipeline

PIP = ".venv/bin/python -m pip install -q --disable-pip-version-check"
PREPARE = [f"{PIP} --no-deps --no-build-isolation -e ."]


def default_of(files: dict[str, str], service: str = "svc") -> pipeline.Pipeline:
    """The default pipeline of a commit holding `files` (top-level name: text)."""
    return pipeline.default(set(files), service, files.get)


def why_of(files: dict[str, str]) -> list[str]:
    """Why the default pipeline of a commit holding `files` is what it is."""
    return pipeline.explain(None, set(files), "svc", files.get)[1]


def install_line(spec: pipeline.Pipeline) -> str:
    """The set-up's `pip install` arguments."""
    venv, install = spec.cache.setup
    assert venv == "python3 -m venv .venv"
    assert install.startswith(PIP + " ")
    return install.removeprefix(PIP + " ")


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()


@pytest.fixture
def resolve_repo(tmp_path, monkeypatch):
    """Resolve a local repository as a run would: its pipeline and why."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))

    def load(repo) -> tuple[pipeline.Pipeline, list[str]]:
        scratch = Path(tempfile.mkdtemp(dir=tmp_path, prefix="scratch-"))
        resolved = git.resolve(str(repo), None, scratch / "snapshots.git", scratch)
        return pipeline.explain(
            resolved.pipeline_text, resolved.files, resolved.name, resolved.read
        )

    return load


CORPUS_DEFAULTS = {
    # pytest's own: flit, dependency group `tests`, ruff pinned by a frozen commit rev.
    "blinker": ("'flit_core<4' pytest pytest-asyncio ruff==0.11.12 -e .", ["lint", "unit"]),
    # setuptools with a C extension; group `tests` is just pytest.
    "markupsafe": ("'setuptools>=77' pytest ruff==0.11.11 -e .", ["lint", "unit"]),
    # hatch with VCS versions (and `editables`, which hatchling's editable build needs);
    # group `tests`, not `dev` (which includes it and typing); ruff pinned by a version tag.
    "structlog": (
        "hatchling hatch-vcs 'hatch-fancy-pypi-readme>=22.8.0' editables 'pytest-asyncio>=0.17' "
        "pytest-randomly 'pytest>=6.0' simplejson 'time-machine>=2.14.1' ruff==0.15.16 -e .",
        ["lint", "unit"],
    ),
}


@pytest.mark.parametrize("name", sorted(CORPUS_DEFAULTS))
def test_default_pipeline_of_each_python_corpus_project(name, tmp_path, resolve_repo):
    """Each Python project of the corpus gets its own .venv with its build requirements, its
    `tests` dependency group and the pinned ruff; every stage re-installs the checkout."""
    spec, why = resolve_repo(corpus_repo(name, tmp_path))
    install, stages = CORPUS_DEFAULTS[name]
    assert spec.service == name
    assert install_line(spec) == install
    assert spec.cache.paths == [".venv"]
    assert spec.cache.prepare == PREPARE
    assert spec.cache.manifests == []  # the defaults of a Python project
    assert spec.cache.setup_timeout == defaults.SETUP_TIMEOUT
    assert spec.stage_names() == stages
    assert spec.stages["lint"].run == ["ruff check --no-fix ."]
    assert spec.stages["unit"].run == ["python -m pytest"]
    assert spec.stages["unit"].retries == 3 and spec.stages["unit"].retry_on == [
        "exit",
        "timeout",
        "infra",
    ]
    assert any("ruff" in line and "pre-commit" in line for line in why)


def test_default_pipeline_of_the_node_corpus_project(tmp_path, resolve_repo):
    """mime-types (mocha, eslint, no lockfile) gets `npm install`, `npm run lint`, `npm test`."""
    spec, why = resolve_repo(corpus_repo("mime-types", tmp_path))
    assert spec.cache.setup == ["npm install"]
    assert spec.cache.paths == ["node_modules"]
    assert spec.cache.prepare == []
    assert spec.stage_names() == ["lint", "unit"]
    assert spec.stages["lint"].run == ["npm run lint"]
    assert spec.stages["unit"].run == ["npm test"]
    assert any("no lockfile" in line for line in why)


def test_corpus_list_is_complete():
    """The corpus tests cover every project of the corpus."""
    assert set(CORPUS_PROJECTS) == {*CORPUS_DEFAULTS, "mime-types"}


def test_dependency_groups_resolve_include_group():
    """A `test` group's `{include-group = ...}` is resolved; `dev` is left out when a test group
    exists, and pytest is not added twice."""
    spec = default_of(
        {
            "pyproject.toml": dedent("""
                [project]
                name = "app"
                version = "1"
                [build-system]
                requires = ["setuptools>=68"]
                build-backend = "setuptools.build_meta"
                [dependency-groups]
                base = ["hypothesis>=6"]
                Test = ["pytest>=8", {include-group = "base"}]
                dev = ["black"]
            """)
        }
    )
    assert install_line(spec) == "'setuptools>=68' 'pytest>=8' 'hypothesis>=6' -e ."
    assert spec.cache.prepare == PREPARE
    assert spec.stage_names() == ["unit"]  # no ruff configured: no lint


def test_dev_group_when_no_test_group():
    """Without a test/tests group the `dev` group holds the test dependencies."""
    spec = default_of(
        {
            "pyproject.toml": dedent("""
                [project]
                name = "app"
                version = "1"
                [dependency-groups]
                dev = ["pytest-mock"]
                docs = ["sphinx"]
            """)
        }
    )
    # No build-system table: PEP 517's fallback; pytest-mock is not pytest.
    assert install_line(spec) == "'setuptools>=40.8.0' wheel pytest-mock pytest -e ."


def test_a_cyclic_dependency_group_is_a_clear_error():
    """A group including itself is refused naming pyproject.toml."""
    text = '[dependency-groups]\ntests = [{include-group = "tests"}]\n[project]\nname = "x"\n'
    with pytest.raises(Unprocessable) as caught:
        default_of({"pyproject.toml": text})
    assert caught.value.field == "pyproject.toml"


def test_test_extras_install_with_the_project():
    """`[project.optional-dependencies] tests` is installed as `-e .[tests]`."""
    files = {
        "pyproject.toml": dedent("""
            [project]
            name = "app"
            version = "1"
            [project.optional-dependencies]
            tests = ["pytest", "responses"]
            docs = ["sphinx"]
            [build-system]
            requires = ["flit_core>=3.9"]
            build-backend = "flit_core.buildapi"
        """)
    }
    spec = default_of(files)
    assert install_line(spec) == "'flit_core>=3.9' -e '.[tests]'"
    assert any("extra tests" in line for line in why_of(files))


def test_requirements_files_at_the_root():
    """requirements.txt and requirements*dev*/*test*.txt are installed with -r (not docs);
    pytest named there (with a version and a comment) is not added again."""
    spec = default_of(
        {
            "setup.py": "from setuptools import setup\nsetup()\n",
            "requirements.txt": "requests>=2\n",
            "requirements-dev.txt": "-r requirements.txt\npytest==8.2.0  # tests\n",
            "requirements_test.txt": "coverage\n",
            "requirements-docs.txt": "sphinx\n",
        }
    )
    assert install_line(spec) == (
        "'setuptools>=40.8.0' wheel -r requirements-dev.txt -r requirements.txt "
        "-r requirements_test.txt -e ."
    )


def test_a_requirements_only_project_is_tested_in_place():
    """With only requirements.txt there is nothing to install editable and nothing to prepare."""
    spec = default_of({"requirements.txt": "flask\n", "app.py": ""})
    assert install_line(spec) == "-r requirements.txt pytest"
    assert spec.cache.prepare == []
    assert spec.stage_names() == ["unit"]


@pytest.mark.parametrize(
    ("files", "ruff"),
    [
        ({"pyproject.toml": "[tool.ruff]\nline-length = 100\n"}, "ruff"),
        ({"pyproject.toml": "[tool.ruff.lint]\nselect = ['E']\n"}, "ruff"),
        ({"requirements.txt": "", "ruff.toml": ""}, "ruff"),
        ({"requirements.txt": "", ".ruff.toml": ""}, "ruff"),
        (
            {
                "requirements.txt": "",
                "ruff.toml": "",
                ".pre-commit-config.yaml": dedent("""
                    repos:
                      - repo: https://github.com/astral-sh/ruff-pre-commit
                        rev: v0.6.9
                        hooks: [{id: ruff}]
                """),
            },
            "ruff==0.6.9",
        ),
        (
            {
                "pyproject.toml": "[tool.ruff]\n",
                ".pre-commit-config.yaml": dedent("""
                    repos:
                      - repo: https://github.com/pre-commit/pre-commit-hooks
                        rev: 3298ddab3c13dd77d6ce1fc0baf97691430d84b0  # frozen: v4.3.0
                      - repo: https://github.com/astral-sh/ruff-pre-commit
                        rev: 76e47323a83cd9795e4ff9a1de1c0d2eef610f17  # frozen: v0.11.11
                """),
            },
            "ruff==0.11.11",
        ),
        (
            {"pyproject.toml": "[tool.ruff]\n", ".pre-commit-config.yaml": "not: [valid"},
            "ruff",
        ),
    ],
)
def test_ruff_configured_gives_a_lint_stage_that_never_fixes(files, ruff):
    """Configured ruff (pyproject, ruff.toml, .ruff.toml) is linted with `--no-fix`, at the
    version ruff-pre-commit pins (tag or `# frozen:` comment), else the latest."""
    spec = default_of(files)
    assert install_line(spec).split()[-1] == ruff
    assert spec.stages["lint"].run == ["ruff check --no-fix ."]
    assert spec.stages["lint"].timeout == defaults.LINT_TIMEOUT


def test_no_ruff_configuration_means_no_lint_stage():
    """A project with a pre-commit ruff hook but no ruff configuration gets no lint stage."""
    files = {
        "setup.py": "",
        ".pre-commit-config.yaml": "repos:\n- repo: https://github.com/astral-sh/ruff-pre-commit"
        "\n  rev: v0.6.9\n",
    }
    spec = default_of(files)
    assert spec.stage_names() == ["unit"]
    assert "ruff" not in install_line(spec)
    assert any(line.startswith("no lint stage") for line in why_of(files))


def test_a_broken_pyproject_is_a_clear_error():
    """pyproject.toml that is not TOML: a 422 naming the file, not a crash."""
    with pytest.raises(Unprocessable) as caught:
        default_of({"pyproject.toml": "[project\n"})
    assert caught.value.field == "pyproject.toml"


@pytest.mark.parametrize(
    ("files", "field"),
    [
        ({"pyproject.toml": "build-system = 'flit'\n[project]\nname = 'x'\n"}, "pyproject.toml"),
        ({"pyproject.toml": "[project]\nname='x'\noptional-dependencies = 3\n"}, "pyproject.toml"),
        ({"package.json": "[1, 2]"}, "package.json"),
    ],
)
def test_manifests_of_the_wrong_shape_are_a_clear_error(files, field):
    """A manifest whose values have the wrong types is a 422 naming it, never a crash."""
    with pytest.raises(Unprocessable) as caught:
        default_of(files)
    assert caught.value.field == field


PACKAGE = '{"scripts": {"lint": "eslint .", "test": "mocha"}}'


@pytest.mark.parametrize(
    ("lockfile", "setup"),
    [("package-lock.json", "npm ci"), ("npm-shrinkwrap.json", "npm ci"), (None, "npm install")],
)
def test_node_dependencies_by_npm_ci_with_a_lockfile_else_npm_install(lockfile, setup):
    """`npm ci` with a lockfile, `npm install` without; node_modules is the cache."""
    files = {"package.json": PACKAGE, "index.js": "", **({lockfile: "{}"} if lockfile else {})}
    spec = default_of(files, "web")
    assert spec.cache.setup == [setup]
    assert spec.cache.paths == ["node_modules"]
    assert spec.stage_names() == ["lint", "unit"]
    assert spec.stages["lint"].run == ["npm run lint"]
    assert spec.stages["unit"].run == ["npm test"]


def test_node_stages_only_for_the_scripts_it_has():
    """Without a lint script there is no lint stage; npm's placeholder test script is none."""
    assert default_of({"package.json": '{"scripts": {"test": "jest"}}'}).stage_names() == ["unit"]
    placeholder = 'echo \\"Error: no test specified\\" && exit 1'
    only_lint = f'{{"scripts": {{"lint": "eslint .", "test": "{placeholder}"}}}}'
    assert default_of({"package.json": only_lint}).stage_names() == ["lint"]


@pytest.mark.parametrize("package", ['{"name": "x"}', '{"scripts": {"build": "tsc"}}', "{}"])
def test_node_project_without_lint_or_test_scripts_is_a_clear_error(package):
    """A package.json with nothing to run is a 422 saying so."""
    with pytest.raises(Unprocessable) as caught:
        default_of({"package.json": package})
    assert caught.value.field == ".faasci.yml"
    assert "neither a lint nor a test script" in caught.value.message


def test_a_broken_package_json_is_a_clear_error():
    """package.json that is not JSON: a 422 naming it."""
    with pytest.raises(Unprocessable) as caught:
        default_of({"package.json": "{"})
    assert caught.value.field == "package.json"


def test_default_pipeline_for_an_unrecognised_project_is_a_clear_error():
    """No pipeline file and no known project file: a 422 saying what was looked for."""
    with pytest.raises(Unprocessable) as caught:
        pipeline.default({"README.md", "main.go"}, "svc")
    e = caught.value
    assert e.status == 422
    assert e.field == ".faasci.yml"
    for name in ("pyproject.toml", "package.json", "no .faasci.yml"):
        assert name in e.message


def test_the_default_reads_through_git_at_the_commit(make_repo, resolve_repo):
    """Manifests are read from the commit, and a file in the repository wins over defaults."""
    repo = make_repo({"requirements.txt": "", "ruff.toml": ""}, "svc")
    assert resolve_repo(repo)[0].stage_names() == ["lint", "unit"]
    (repo / ".faasci.yml").write_text("stages: {unit: {run: [make test]}}\n")
    spec, why = resolve_repo(repo)  # uncommitted: a snapshot, read the same way
    assert spec.stage_names() == ["unit"] and spec.cache is None
    assert why == ["the commit's .faasci.yml"]


def test_the_default_as_a_file_means_the_same_pipeline():
    """The YAML of a default pipeline parses back to the same pipeline (what --explain prints
    can be saved as .faasci.yml)."""
    spec = default_of({"pyproject.toml": "[project]\nname='a'\n[tool.ruff]\n"}, "a")
    assert pipeline.parse(spec.to_yaml(), "other").model_dump() == spec.model_dump()
    assert "retries" not in spec.to_yaml()  # values left at their default are not said


def test_explain_prints_the_pipeline_and_why_without_a_stack(make_repo, capsys, monkeypatch):
    """`faasci run --explain` resolves locally and prints the file it would run, reasons as
    comments; it starts nothing (the gateway is unreachable and never asked)."""
    monkeypatch.setenv("OPENFAAS_URL", "http://127.0.0.1:9")
    repo = make_repo({"package-lock.json": "{}", "package.json": PACKAGE}, "web")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(repo.parent))
    assert cli.main(["run", "--explain", str(repo)]) == 0
    out = capsys.readouterr().out
    comments = [line for line in out.splitlines() if line.startswith("#")]
    assert any("npm ci" in line and "package-lock.json" in line for line in comments)
    spec = pipeline.parse(out, "ignored")
    files = {"package.json": PACKAGE, "package-lock.json": "{}"}
    assert spec.model_dump() == default_of(files, "web").model_dump()
    monkeypatch.chdir(repo)
    assert cli.main(["run", "--explain"]) == 0  # the current folder
    assert pipeline.parse(capsys.readouterr().out, "x").service == "web"
    assert cli.main(["run", "--explain", str(repo / "missing")]) == 2


def test_a_build_stage_may_only_build_an_image():
    """`docker` alone is a whole build stage; a later stage may run in the image it built."""
    p = pipeline.parse("stages:\n  build:\n    docker: {args: {VERSION: 2}}\n"
                       "  integration: {image: built, run: [pytest]}\n", "svc")  # fmt: skip
    build = p.stages["build"]
    assert build.run == [] and build.docker.file == "Dockerfile" and build.docker.context == "."
    assert build.docker.args == {"VERSION": "2"}
    assert p.stages["integration"].image == pipeline.BUILT
