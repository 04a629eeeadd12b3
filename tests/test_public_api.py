"""The public Python API (`dpsgd_cli`): its exact surface, lazy imports (no TensorFlow for `import
dpsgd_cli` or the privacy questions), documented names, and `epsilon` / `noise_multiplier` answering as
dp-accounting and the CLI do."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import dp_accounting
import pytest
from typer.testing import CliRunner

import dpsgd_cli
from dpsgd_cli.cli import app
from dpsgd_cli.errors import ConfigError

PUBLIC = ["DPModel", "DpsgdError", "ExperimentConfig", "RunResult", "epsilon", "load_config",
          "noise_multiplier", "run"]
HOMES = {"DPModel": "dpsgd_cli.keras_api", "DpsgdError": "dpsgd_cli.errors",
         "ExperimentConfig": "dpsgd_cli.config", "RunResult": "dpsgd_cli.experiment.run",
         "epsilon": "dpsgd_cli.privacy.answer",
         "load_config": "dpsgd_cli.config", "noise_multiplier": "dpsgd_cli.privacy.answer",
         "run": "dpsgd_cli.experiment.run"}


def test_the_surface_is_pinned():
    assert dpsgd_cli.__all__ == PUBLIC
    assert set(PUBLIC) <= set(dir(dpsgd_cli))
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        dpsgd_cli.Trainer  # noqa: B018


@pytest.mark.parametrize("name", PUBLIC)
def test_each_name_is_importable_and_is_its_modules_object(name):
    namespace: dict = {}
    exec(f"from dpsgd_cli import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(HOMES[name]), name)


@pytest.mark.parametrize("name", PUBLIC)
def test_each_name_documents_its_arguments_and_result(name):
    obj = getattr(dpsgd_cli, name)
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        assert "Args:" in doc or "Attributes:" in doc, name
    else:
        assert "Args:" in doc and "Returns:" in doc, name
        for parameter in inspect.signature(obj).parameters:
            assert f"{parameter}:" in doc, f"{name}: {parameter} undocumented"


def _modules_after(code: str) -> dict[str, bool]:
    probe = (f"import sys, json\n{code}\nprint(json.dumps({{m: m in sys.modules for m in "
             "('tensorflow', 'keras', 'dp_accounting', 'dpsgd_cli.privacy.answer')}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_dpsgd_cli_imports_no_tensorflow_and_nothing_it_exports():
    loaded = _modules_after("import dpsgd_cli")
    assert loaded == {"tensorflow": False, "keras": False, "dp_accounting": False,
                      "dpsgd_cli.privacy.answer": False}


def test_the_privacy_questions_need_no_tensorflow():
    loaded = _modules_after("from dpsgd_cli import epsilon, noise_multiplier, load_config, ExperimentConfig, "
                            "DpsgdError\nepsilon(1.1, steps=100, sampling_rate=0.01)")
    assert loaded["dpsgd_cli.privacy.answer"] and not loaded["tensorflow"] and not loaded["keras"]


def test_epsilon_is_dp_accountings_rdp_epsilon():
    sigma, q, steps, delta = 1.1, 256 / 60_000, 2_000, 1e-5
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    expected = accountant.get_epsilon(delta)
    ours = dpsgd_cli.epsilon(sigma, steps=steps, sampling_rate=q, delta=delta)
    assert ours == pytest.approx(expected, rel=1e-9)
    # the same training described by epochs: ⌈E·n/B⌉ steps, as dpsgd train counts them
    by_epochs = dpsgd_cli.epsilon(sigma, epochs=steps * 256 / 60_000, batch_size=256, dataset_size=60_000)
    assert by_epochs == pytest.approx(expected, rel=1e-9)


def test_microbatches_are_accounted_with_half_sigma():
    halved = dpsgd_cli.epsilon(0.55, steps=500, batch_size=256, dataset_size=60_000)
    assert dpsgd_cli.epsilon(1.1, steps=500, batch_size=256, dataset_size=60_000,
                             num_microbatches=128) == pytest.approx(halved, rel=1e-12)


def test_noise_multiplier_is_the_smallest_sigma_within_the_target():
    setting = {"epochs": 20, "batch_size": 256, "dataset_size": 60_000}
    sigma = dpsgd_cli.noise_multiplier(1.0, **setting)
    assert dpsgd_cli.epsilon(sigma, **setting) <= 1.0
    assert dpsgd_cli.epsilon(sigma * (1 - 2e-3), **setting) > 1.0  # rounded up by less than 1e-3
    assert float(f"{sigma:.4g}") == sigma


def test_epsilon_of_a_config_is_what_the_cli_reports(tmp_path):
    result = CliRunner().invoke(app, ["epsilon", "--config", "configs/quickstart.yaml", "--json"])
    assert result.exit_code == 0, result.output
    expected = json.loads(result.output)["epsilon_rdp"]
    assert dpsgd_cli.epsilon(config="configs/quickstart.yaml") == pytest.approx(expected, rel=1e-12)
    cfg = dpsgd_cli.load_config("configs/quickstart.yaml")
    assert dpsgd_cli.epsilon(config=cfg) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: dpsgd_cli.epsilon(steps=10, sampling_rate=0.1), "--sigma"),
    (lambda: dpsgd_cli.epsilon(1.0, sampling_rate=0.1), "--steps N or --epochs E"),
    (lambda: dpsgd_cli.epsilon(1.0, steps=10, sampling_rate=0.1, accountant="moments"), "accountant"),
    (lambda: dpsgd_cli.epsilon(1.0, config="configs/quickstart.yaml"), "noise_multiplier"),
    (lambda: dpsgd_cli.noise_multiplier(-1.0, steps=10, sampling_rate=0.1), "--target-epsilon"),
])
def test_bad_questions_raise_one_line_config_errors(call, message):
    with pytest.raises(ConfigError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_the_package_says_it_is_typed():
    from pathlib import Path

    assert (Path(dpsgd_cli.__file__).parent / "py.typed").is_file()
