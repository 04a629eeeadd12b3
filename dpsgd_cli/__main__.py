from dpsgd_cli.cli import run

raise SystemExit(run())
