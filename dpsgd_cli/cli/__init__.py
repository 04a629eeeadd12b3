"""The `dpsgd` command line. Each command group lives in its own module; importing it registers it."""

from dpsgd_cli.cli import audit as _audit  # noqa: F401  (dpsgd audit)
from dpsgd_cli.cli import bench as _bench  # noqa: F401  (dpsgd bench)
from dpsgd_cli.cli import class_gap as _class_gap  # noqa: F401  (dpsgd class-gap)
from dpsgd_cli.cli import config as _config  # noqa: F401  (dpsgd config schema, dpsgd config show)
from dpsgd_cli.cli import export as _export  # noqa: F401  (dpsgd export)
from dpsgd_cli.cli import privacy as _privacy  # noqa: F401  (dpsgd epsilon, dpsgd noise)
from dpsgd_cli.cli import sweep as _sweep  # noqa: F401  (dpsgd sweep, plot, report)
from dpsgd_cli.cli import train as _train  # noqa: F401  (dpsgd train)
from dpsgd_cli.cli import tune as _tune  # noqa: F401  (dpsgd tune)
from dpsgd_cli.cli.app import app, reflow_help, run

reflow_help(app)

__all__ = ["app", "run"]
