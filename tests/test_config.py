"""Config loading: every shipped config loads; bad values fail with the key named; overrides work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpsgd_cli.config import ARCHITECTURES, load_config, microbatch_size, resolve_aliases
from dpsgd_cli.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_dir_is_complete():
    names = {p.name for p in CONFIGS}
    assert {"fashion_mnist_sigma1.1.yaml", "fashion_mnist_sigma1.2.yaml", "mnist_tutorial.yaml",
            "fashion_mnist_nonprivate.yaml", "quickstart.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_baseline_and_tutorial_values():
    seed = load_config(CONFIGS[0].parent / "fashion_mnist_sigma1.2.yaml")
    assert (seed.privacy.noise_multiplier, seed.privacy.l2_norm_clip, seed.training.learning_rate,
            seed.training.epochs, seed.training.optimizer) == (1.2, 1.0, 0.001, 100, "adam")
    tut = load_config(CONFIGS[0].parent / "mnist_tutorial.yaml")
    assert (tut.data.dataset, tut.privacy.noise_multiplier, tut.training.learning_rate, tut.data.batch_size,
            tut.training.epochs, tut.training.optimizer) == ("mnist", 1.1, 0.15, 256, 60, "sgd")


def test_overrides_and_float_strings():
    cfg = load_config(None, ["privacy.noise_multiplier=1.3", "privacy.delta=1e-6", "data.batch_size=128",
                             "training.jit_compile=false"])
    assert cfg.privacy.noise_multiplier == 1.3 and cfg.privacy.delta == 1e-6
    assert cfg.data.batch_size == 128 and cfg.training.jit_compile is False


@pytest.mark.parametrize("override,key", [
    ("privacy.noise_multiplier=-0.5", "privacy.noise_multiplier"),
    ("privacy.l2_norm_clip=0", "privacy.l2_norm_clip"),
    ("privacy.num_microbatches=7", "privacy.num_microbatches"),
    ("data.dataset=svhn", "data.dataset"),
    ("data.dataset=npz", "data.path"),
    ("data.path=x.npz", "data.path"),
    ("tracking.mlflow=0", "tracking.mlflow"),
    ("tracking.mlflow=mlruns", "tracking.mlflow"),
    ("data.batch_size=abc", "data.batch_size"),
    ("data.batch_size=true", "data.batch_size"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("training.optimizer=rmsprop", "training.optimizer"),
    ("training.epochs=0", "training.epochs"),
    ("model.activation=gelu", "model.activation"),
    ("privacy.sigma=1.0", "privacy.sigma"),
    ("name=../escape", "name"),
    ("model.input_std=0", "model.input_std"),
    ("model.input_mean=nan", "model.input_mean"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["privacy.noise_multiplier=1.0", override])
    assert str(info.value).startswith(key)
    assert "\n" not in str(info.value)


def test_input_standardization_is_for_pixel_models_only():
    cfg = load_config(None, ["privacy.noise_multiplier=1.0", "model.input_mean=0.5", "model.input_std=0.5"])
    assert (cfg.model.input_mean, cfg.model.input_std) == (0.5, 0.5)
    for other in ("model.architecture=scatter_cnn_16_32", "model.builder=pkg.mod:fn"):
        with pytest.raises(ConfigError, match="^model.input_mean, model.input_std: only for the pixel"):
            load_config(None, ["privacy.noise_multiplier=1.0", "model.input_mean=0.5", other])


def test_privacy_needs_exactly_one_of_sigma_or_target():
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(None, ["privacy.noise_multiplier=1", "privacy.target_epsilon=3"])
    assert load_config(None, ["privacy.enabled=false"]).privacy.noise_multiplier is None


def test_microbatches_need_shuffled_batches():
    with pytest.raises(ConfigError, match="poisson"):
        load_config(None, ["privacy.noise_multiplier=1", "privacy.num_microbatches=32"])
    cfg = load_config(None, ["privacy.noise_multiplier=1", "privacy.num_microbatches=32",
                             "data.sampling=shuffle"])
    assert microbatch_size(cfg) == 256 // 32


def test_yaml_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("privacy:\n  noise_multiplier: -1\n")
    proc = subprocess.run([sys.executable, "-m", "dpsgd_cli", "train", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "privacy.noise_multiplier" in lines[0]


OTHER_NAMES = {"scatter_cnn": "scatter_cnn_16_32", "scatter_cnn_wide": "scatter_cnn_32_64",
               "scatter_cnn_wider": "scatter_cnn_64_128"}


@pytest.mark.parametrize("other,name", OTHER_NAMES.items())
def test_other_architecture_names_resolve_to_the_model_name(other, name, tmp_path):
    assert name in ARCHITECTURES and other not in ARCHITECTURES  # configs are written with the names
    sigma = "privacy.noise_multiplier=1.0"
    assert load_config(None, [sigma, f"model.architecture={other}"]).model.architecture == name
    path = tmp_path / "run.yaml"  # a config written under the other name, as an older run.yaml holds it
    path.write_text(yaml.safe_dump({"privacy": {"noise_multiplier": 1.0}, "model": {"architecture": other}}))
    cfg = load_config(path)
    assert cfg.model.architecture == name and cfg.to_dict()["model"]["architecture"] == name
    raw = {"model": {"architecture": other, "activation": "tanh"}, "seed": 3}
    assert resolve_aliases(raw) == {"model": {"architecture": name, "activation": "tanh"}, "seed": 3}
    assert raw["model"]["architecture"] == other  # the caller's mapping is left as it was


def test_an_unknown_architecture_lists_the_model_names_only():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["privacy.noise_multiplier=1.0", "model.architecture=scatter_cnn_8_16"])
    message = str(info.value)
    assert message.startswith("model.architecture") and "choose one of: " in message
    assert message.split("choose one of: ")[1].split(", ") == list(ARCHITECTURES)
