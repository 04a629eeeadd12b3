from dpsgd_cli.cli import app

app()
