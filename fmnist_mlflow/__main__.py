"""`python -m fmnist_mlflow` runs the `fmnist` command."""

from .cli import entry

entry()
