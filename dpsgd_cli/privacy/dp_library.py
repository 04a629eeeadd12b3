"""dp-accounting's RDP accountant and mechanism calibration, imported without the rest of the package.

`import dp_accounting` runs the package's `__init__`, which imports every accountant it has: the PLD
modules pull in scipy.signal and scipy.stats, which take 1.4–2.2 s on a 2-core machine — most of the
time `dpsgd epsilon` would take, although the RDP accountant itself needs only numpy and
scipy.special. So the few modules an RDP question needs (`dp_event`, `rdp`, `mechanism_calibration`)
are imported as they are, unchanged, through a stand-in for the package object that has the package's
search path but does not run its `__init__`. The stand-in is removed as soon as they are loaded: a later
`import dp_accounting` runs the real `__init__`, which finds the loaded submodules in `sys.modules` and
reuses them, so every class is the same object either way (tested).

If dp-accounting is already imported, or its layout ever changes so that this fails, the whole package
is imported the ordinary way: slower, never different.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

PACKAGE = "dp_accounting"


@functools.cache
def dp_module(name: str) -> types.ModuleType:
    """`dp_accounting.<name>` (e.g. "dp_event", "rdp", "mechanism_calibration"), imported without the rest
    of the package when it is not imported yet, else the ordinary way."""
    try:
        return _import_without_package_init(name)
    except (ImportError, AttributeError):  # a dp-accounting laid out differently: import it whole
        import dp_accounting

        return getattr(dp_accounting, name)


def _import_without_package_init(name: str) -> types.ModuleType:
    """`dp_accounting.<name>` without running `dp_accounting/__init__.py` (see the module docstring)."""
    if PACKAGE in sys.modules:
        return importlib.import_module(f"{PACKAGE}.{name}")
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{PACKAGE} is not installed as a package")
    stand_in = types.ModuleType(PACKAGE, "stand-in for dp_accounting while one submodule loads")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules[PACKAGE] = stand_in
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        if sys.modules.get(PACKAGE) is stand_in:
            del sys.modules[PACKAGE]
