"""`python -m fmnist_mlflow` runs the `fmnist` command."""

from .cli.main import entry

entry()
