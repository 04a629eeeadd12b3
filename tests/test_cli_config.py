"""`dpsgd config schema` and `dpsgd config show` (no TensorFlow): the committed schema file is the generated
one, every shipped config validates against it (with the `jsonschema` package, when installed), and `show`
prints a config that loads back to the same config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_cli_train import error_line, invoke

from dpsgd_cli.config import json_schema, json_schema_text, load_config, reference_rows

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "docs" / "dpsgd-config.schema.json"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_committed_schema_is_the_generated_one():
    text = SCHEMA_FILE.read_text(encoding="utf-8")
    assert text == json_schema_text(), "regenerate: dpsgd config schema -o docs/dpsgd-config.schema.json"
    assert json.loads(text) == json_schema()


def test_the_schema_describes_every_key_with_its_help_and_choices():
    schema = json_schema()
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for key, default, help_, choices in reference_rows():
        node = schema
        *sections, name = key.split(".")
        for section in sections:
            node = schema["$defs"][schema["properties"][section]["$ref"].rsplit("/", 1)[1]]
        assert node["additionalProperties"] is False
        prop = node["properties"][name]
        assert prop["description"] == help_ and help_, key
        assert prop.get("enum") == (list(choices) if choices is not None else None), key
        assert prop["default"] == default, key


def test_schema_prints_and_writes_the_same_text(tmp_path):
    printed = invoke("config", "schema")
    assert printed.exit_code == 0 and printed.stdout == json_schema_text()
    out = tmp_path / "sub" / "schema.json"
    written = invoke("config", "schema", "--output", out)
    assert written.exit_code == 0 and f"wrote {out}" in written.stdout
    assert out.read_text(encoding="utf-8") == json_schema_text()


def test_schema_to_an_unwritable_place_is_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("config", "schema", "-o", blocker / "schema.json")
    assert result.exit_code == 1 and "cannot write" in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "not a folder"


class Yaml12Loader(yaml.SafeLoader):
    """YAML as editors read it (1.2): `1e-5` is a number there, a string in PyYAML's YAML 1.1."""


Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$"),
                                   list("-+.0123456789"))


def test_the_editor_reading_of_yaml_takes_exponents_as_numbers():
    assert yaml.load("a: 1e-5\nb: 2\nc: 1.0e-5\nd: e5", Loader=Yaml12Loader) == {"a": 1e-5, "b": 2, "c": 1e-5,
                                                                                 "d": "e5"}


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    assert cls is jsonschema.Draft7Validator
    cls.check_schema(schema)  # the schema itself is valid draft-07
    return cls(schema)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_against_the_schema(path):
    validator = _validator()
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=Yaml12Loader)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors


@pytest.mark.parametrize("doc, where", [
    ({"privacy": {"sigma": 1.0}}, "privacy"),  # unknown key
    ({"model": {"architecture": "resnet50"}}, "model.architecture"),  # not one of the choices
    ({"data": {"batch_size": "big"}}, "data.batch_size"),  # wrong type
    ({"training": {"jit_compile": "yes"}}, "training.jit_compile"),
    ({"colour": "blue"}, ""),
])
def test_the_schema_refuses_what_the_loader_refuses(doc, where):
    validator = _validator()
    errors = list(validator.iter_errors(doc))
    assert errors and {".".join(map(str, e.absolute_path)) for e in errors} == {where}


def test_show_prints_the_config_as_read_and_it_loads_back(tmp_path):
    config = ROOT / "configs" / "quickstart.yaml"
    sets = ["training.epochs=7", "model.architecture=scatter_cnn_wide"]
    result = invoke("config", "show", "--config", config, *[a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    expected = load_config(config, sets)
    assert shown == expected.to_dict()
    assert shown["model"]["architecture"] == "scatter_cnn_32_64" and shown["training"]["epochs"] == 7
    again = tmp_path / "shown.yaml"
    again.write_text(result.stdout, encoding="utf-8")
    assert load_config(again) == expected


@pytest.mark.parametrize("args, message", [
    (["--config", "no-such.yaml"], "no-such.yaml: config file not found"),
    (["--config", "configs/quickstart.yaml", "--set", "privacy.sigma=1"], "privacy.sigma: unknown key"),
    (["--set", "model.architecture=resnet50"], "model.architecture: 'resnet50' is not allowed"),
])
def test_show_refuses_a_bad_config_in_one_line(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = invoke("config", "show", *args)
    assert result.exit_code == 2 and message in error_line(result) and not result.stdout
