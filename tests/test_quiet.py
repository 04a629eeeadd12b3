"""The terminal holds only our lines: TensorFlow's C++ start-up lines are hidden unless --verbose or
DPSGD_VERBOSE=1 asks for them, and errors stay one line (dpsgd_cli.cli.quiet)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from dpsgd_cli.cli import quiet

# What TensorFlow's start-up prints on a CPU machine: absl's preamble, its log prefix
# (I/W/E/F + MMDD or 0000, time, thread, file:line]) and the notices themselves.
TF_LINE = re.compile(r"absl::InitializeLog|^[IWEF]\d{4} \d\d:\d\d:\d\d|oneDNN|cuda drivers|cpu_feature_guard|"
                     r"cuInit|rebuild TensorFlow", re.MULTILINE)


def _dpsgd(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet.VERBOSE_ENV)} | env
    return subprocess.run([sys.executable, "-m", "dpsgd_cli", *args], capture_output=True, text=True,
                          env=environ, timeout=600)


def _builder_error_args(tiny_overrides: list[str]) -> list[str]:
    """A command that imports TensorFlow (to build the model) and then fails on bad input."""
    return ["train", "--set", "model.builder=json:dumps", *[a for o in tiny_overrides for a in ("--set", o)]]


def test_tensorflow_startup_lines_hidden_and_the_error_stays_one_line(tiny_overrides):
    proc = _dpsgd(_builder_error_args(tiny_overrides))
    assert proc.returncode == 2, proc.stderr
    assert not TF_LINE.search(proc.stderr + proc.stdout), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.builder: 'json:dumps'"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["--verbose", "DPSGD_VERBOSE"])
def test_verbose_shows_tensorflow_lines(tiny_overrides, how):
    """The same command shows TensorFlow's lines when asked: what the quiet default hides is real."""
    args = _builder_error_args(tiny_overrides)
    proc = _dpsgd(["--verbose", *args]) if how == "--verbose" else _dpsgd(args, DPSGD_VERBOSE="1")
    assert proc.returncode == 2
    assert TF_LINE.search(proc.stderr), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.builder: 'json:dumps'")


@pytest.mark.slow
def test_train_prints_only_its_own_lines(tiny_overrides):
    proc = _dpsgd(["train", "--config", "configs/quickstart.yaml", "--epochs", "1",
                   *[a for o in tiny_overrides for a in ("--set", o)]])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert not TF_LINE.search(proc.stdout), proc.stdout
    out = proc.stdout.splitlines()
    assert out[0].startswith("quickstart: fashion_mnist, 1 epochs")
    assert out[1].startswith("epoch 1: train loss")
    assert any(line.startswith("wrote ") for line in out)


def test_stderr_silenced_restores_file_descriptor_2(capfd):
    os.write(2, b"before\n")
    with quiet.stderr_silenced():
        os.write(2, b"hidden\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before\nafter\n"


def test_install_keeps_a_log_level_the_user_set(monkeypatch, request):
    logger = logging.getLogger("tensorflow")
    request.addfinalizer(lambda level=logger.level: logger.setLevel(level))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    quiet.install()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    quiet.install()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == quiet.QUIET_LOG_LEVEL
    assert logger.getEffectiveLevel() == logging.ERROR  # TensorFlow's Python warnings too
