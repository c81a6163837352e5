"""`python -m fmnist_mlflow` runs the `fmnist` command."""

from .cli import main

main(prog_name="fmnist")
