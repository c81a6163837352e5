"""fmnist-mlflow: the report's Fashion-MNIST CNN sweep, tracked with MLflow and extended with Optuna.

The packages by role: cli, training, tracking, studies, results (see the README's Layout).
"""
