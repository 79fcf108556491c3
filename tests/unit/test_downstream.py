"""Downstream pipelines without the stack: what manifests publish and pin, what a change of
them moved, the graph, its cycles, and who a release starts."""

from __future__ import annotations

import pytest

from faasci import downstream, pipeline
from faasci.downstream import Entry, bumps, cycles, dependents, edges, published
from faasci.errors import Unprocessable
from faasci.runs import new_run

PYPROJECT = """
[project]
name = "Sample_Lib"
version = "{version}"
dependencies = ["requests==2.31.0", "pydantic>=2", "rich[jupyter]==13.7.1 ; python_version>'3'"]
"""


def entry(service: str, depends_on=(), **fields) -> Entry:
    return Entry(service=service, repo=f"/src/{service}", ref="main", commit="c" * 40,
                 depends_on=list(depends_on), **fields)  # fmt: skip


def test_pyproject_publishes_its_name_and_version_and_pins():
    """pyproject.toml names the package and version; exact pins are read, ranges are not."""
    name, version, pins = published({"pyproject.toml": PYPROJECT.format(version="1.2.0")})
    assert (name, version) == ("Sample_Lib", "1.2.0")
    assert pins == {"requests": "2.31.0", "rich": "13.7.1"}


def test_requirements_package_json_and_go_mod_pins():
    """requirements*.txt, package.json and go.mod each contribute what they pin exactly."""
    files = {
        "requirements-dev.txt": "# tools\nsample_lib==0.2.0\nflask>=3\n-r base.txt\n",
        "package.json": '{"name": "@acme/web", "version": "3.0.1", '
        '"dependencies": {"left-pad": "1.3.0", "react": "^18.2.0"}}',
        "go.mod": "module github.com/acme/api\n\nrequire (\n\tgithub.com/acme/lib v1.4.0\n)\n",
    }
    name, version, pins = published(files)
    assert (name, version) == ("@acme/web", "3.0.1")
    assert pins == {"sample-lib": "0.2.0", "left-pad": "1.3.0", "github.com/acme/lib": "v1.4.0"}


def test_a_broken_manifest_says_nothing():
    """A manifest that does not parse publishes nothing rather than failing the run."""
    assert published({"pyproject.toml": "[project\nname=", "package.json": "{"}) == (None, None, {})


def test_version_bump_detected_from_the_manifest_diff():
    """A new version in pyproject.toml is a bump of the package; an unchanged one is not."""

    def state(version, pin="2.31.0"):
        text = PYPROJECT.format(version=version).replace("2.31.0", pin)
        package, v, pins = published({"pyproject.toml": text})
        return entry("sample-lib", package=package, version=v, pins=pins)

    assert bumps(state("1.2.0"), state("1.3.0")) == {"sample-lib": ("1.2.0", "1.3.0")}
    assert bumps(state("1.2.0"), state("1.2.0")) == {}
    assert bumps(state("1.2.0"), state("1.2.0", pin="2.32.0")) == {"requests": ("2.31.0", "2.32.0")}
    assert bumps(None, state("1.2.0")) == {}  # a first sighting moved nothing


def test_dependents_by_service_or_package_name_never_itself():
    """A dependent names the library by service or package (PEP 503-normalized); the library
    itself, even when it lists itself, is never its own dependent."""
    lib = entry("libsvc", ["libsvc"], package="Sample.Lib")
    catalog = {"libsvc": lib, "a": entry("a", ["sample_lib"]), "b": entry("b", ["libsvc"]),
               "c": entry("c", ["requests"])}  # fmt: skip
    assert [e.service for e in dependents(catalog, lib)] == ["a", "b"]
    assert edges(catalog) == {"a": ["libsvc"], "b": ["libsvc"], "c": [], "libsvc": []}


def test_cycles_are_found_once():
    """A -> B -> C -> A is reported once, a self-dependency is not an edge, acyclic parts
    add nothing."""
    catalog = {"a": entry("a", ["b"]), "b": entry("b", ["c"]), "c": entry("c", ["a", "c"]),
               "d": entry("d", ["a"]), "e": entry("e", ["f"]), "f": entry("f", ["e"])}  # fmt: skip
    assert cycles(catalog) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"x": entry("x", ["x"])}) == []


def test_graph_lists_dependents_and_renders_edges():
    """graph() gives each service its depends_on and dependents; render() shows both ways."""
    catalog = {"lib": entry("lib", package="lib", version="0.2.0"),
               "svc": entry("svc", ["lib", "requests"])}  # fmt: skip
    answer = downstream.graph(catalog)
    assert answer["services"]["lib"]["dependents"] == ["svc"]
    assert answer["services"]["svc"]["depends_on"] == ["lib", "requests"]
    text = downstream.render(answer)
    assert "lib 0.2.0\n  <- svc" in text and "svc\n  -> lib\n  -> requests" in text


def test_only_a_full_run_releases():
    """A full run releases at promote (or at its end without one); a one-stage run never."""
    spec = pipeline.validate({"service": "lib", "stages": {"unit": {"run": ["true"]},
                              "promote": {"run": ["true"]}}})  # fmt: skip
    fields = {"repo": "/r", "ref": "main", "commit": "c" * 40, "source": "/r"}
    run = new_run(spec, **fields)
    assert not downstream.released(run)
    run.stage("promote").status = "passed"
    assert downstream.released(run)
    one = new_run(spec, only="promote", **fields)
    one.stage("promote").status = "passed"
    assert not downstream.released(one)


def test_depends_on_is_validated_by_name():
    """depends_on takes package and service names; anything else is refused naming the field."""
    names = ["sample-lib", "@acme/web", "github.com/acme/lib"]
    ok = pipeline.validate({"service": "s", "depends_on": names,
                            "stages": {"unit": {"run": ["true"]}}})  # fmt: skip
    assert ok.depends_on == names
    with pytest.raises(Unprocessable) as bad:
        pipeline.validate({"service": "s", "depends_on": ["rm -rf /"],
                           "stages": {"unit": {"run": ["true"]}}})  # fmt: skip
    assert bad.value.field == "depends_on.0"
