"""dpsgd_cli.privacy.dp_library: dp-accounting's RDP modules load without the package's slow PLD
imports, and are
the very modules (and classes) a later `import dp_accounting` gives."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from dpsgd_cli.privacy import accounting
from dpsgd_cli.privacy.dp_library import dp_module

q, steps, delta = 256 / 60000, 23438, 1e-5
eps = accounting.epsilon(1.1, q, steps, delta, "rdp")
before = {name: name in sys.modules for name in ("dp_accounting", "dp_accounting.pld", "scipy.signal",
                                                   "scipy.stats", "dp_accounting.rdp")}
rdp_module, event_module = dp_module("rdp"), dp_module("dp_event")

import dp_accounting  # the real package now: its __init__ must run and reuse the loaded submodules

step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1))
direct = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.SelfComposedDpEvent(step, steps))
print(json.dumps({
    "before": before,
    "package_is_real": hasattr(dp_accounting, "calibrate_dp_mechanism") and hasattr(dp_accounting, "pld"),
    "same_rdp_module": dp_accounting.rdp is rdp_module,
    "same_accountant_class": dp_accounting.rdp.RdpAccountant is rdp_module.RdpAccountant,
    "same_event_class": dp_accounting.GaussianDpEvent is event_module.GaussianDpEvent,
    "eps": eps, "eps_direct": direct.get_epsilon(delta),
}))
"""


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rdp_epsilon_loads_only_what_it_needs_and_the_package_still_imports_whole():
    out = _run(SCRIPT)
    assert out["before"] == {"dp_accounting": False, "dp_accounting.pld": False, "scipy.signal": False,
                             "scipy.stats": False, "dp_accounting.rdp": True}
    assert out["package_is_real"]
    assert out["same_rdp_module"] and out["same_accountant_class"] and out["same_event_class"]
    assert out["eps"] == out["eps_direct"]


def test_after_the_package_is_imported_the_same_modules_are_returned():
    out = _run("""
import json
import dp_accounting
from dpsgd_cli.privacy.dp_library import dp_module
print(json.dumps({"rdp": dp_module("rdp") is dp_accounting.rdp,
                  "calibration": dp_module("mechanism_calibration") is dp_accounting.mechanism_calibration}))
""")
    assert out == {"rdp": True, "calibration": True}


def test_falls_back_to_the_whole_package_when_the_submodule_import_fails():
    out = _run("""
import json, sys
from dpsgd_cli.privacy import dp_library

def broken(name):
    raise ImportError("laid out differently")

dp_library._import_without_package_init = broken
module = dp_library.dp_module("rdp")
import dp_accounting
print(json.dumps({"loaded_whole": "dp_accounting.pld" in sys.modules, "same": module is dp_accounting.rdp}))
""")
    assert out == {"loaded_whole": True, "same": True}
