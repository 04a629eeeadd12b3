"""The machine description quoted with every benchmark figure."""

from __future__ import annotations

import platform
import subprocess

from dpsgd_cli.training import machine

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 1

processor\t: 1
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
"""


def test_cpu_fields_come_from_proc_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(INTEL)
    info = machine.cpu_info(path)
    assert info["cpu_model_name"] == "Intel(R) Xeon(R) Processor"
    assert (info["cpu_family"], info["cpu_model"]) == ("6", "167")
    assert int(info["cpu_threads"]) >= 1


def test_a_machine_without_them_falls_back_to_lscpu_then_says_unknown(tmp_path, monkeypatch):
    arm = tmp_path / "cpuinfo"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n")
    lscpu = "Architecture:  aarch64\nModel name:    Neoverse-N1\nModel:         1\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, lscpu, ""))
    info = machine.cpu_info(arm)
    assert (info["cpu_model_name"], info["cpu_model"], info["cpu_family"]) == ("Neoverse-N1", "1", "unknown")

    def no_lscpu(*args, **kwargs):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(subprocess, "run", no_lscpu)
    info = machine.cpu_info(tmp_path / "missing")
    assert info["cpu_model_name"] == (platform.processor() or platform.machine() or "unknown")
    assert (info["cpu_family"], info["cpu_model"]) == ("unknown", "unknown")


def test_tensorflow_settings_and_the_printed_lines(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    row = machine.machine_row()
    assert row["TF_ENABLE_ONEDNN_OPTS"] == "0" and row["onednn"] in ("on", "off", "unknown")
    assert row["tensorflow"].count(".") >= 1 and isinstance(row["intra_op_threads"], int)
    cpu, tf = machine.describe(row)
    fields = f"(family {row['cpu_family']}, model {row['cpu_model']})"
    assert cpu.startswith(f"CPU: {row['cpu_model_name']} {fields}")
    assert tf.startswith(f"TensorFlow {row['tensorflow']}") and f"oneDNN {row['onednn']}" in tf
