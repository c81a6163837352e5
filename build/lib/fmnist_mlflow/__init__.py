"""fmnist-mlflow: the report's Fashion-MNIST CNN sweep, tracked with MLflow and extended with Optuna."""

__version__ = "0.1.0"
