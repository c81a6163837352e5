import math

import pytest
import torch

from fmnist_mlflow.training import train
from fmnist_mlflow.training.config import ConfigError, RunConfig


def test_same_seed_same_metrics(tiny_data):
    config = RunConfig(model="model2", epochs=2, subset=600, seed=3, device="cpu")  # bit-equal only on one device
    a = train.fit(config, tiny_data).history
    b = train.fit(config, tiny_data).history
    strip = lambda h: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h]  # noqa: E731
    assert strip(a) == strip(b)
    c = train.fit(RunConfig(model="model2", epochs=2, subset=600, seed=4, device="cpu"), tiny_data).history
    assert strip(c) != strip(a)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_metrics_are_per_example_means(tiny_data, loss):
    history = train.fit(RunConfig(loss=loss, epochs=1, subset=600), tiny_data).history
    (m,) = history
    assert set(m) == {"epoch", "train_loss", "val_loss", "val_nll", "val_accuracy", "epoch_seconds"}
    assert 0 <= m["val_accuracy"] <= 1 and m["epoch_seconds"] > 0
    # an untrained-ish net: CE near ln(10) = 2.3, BCE per output near ln(2) = 0.69 at most
    assert 0.05 < m["train_loss"] < (2.5 if loss == "ce" else 0.7)
    if loss == "ce":
        assert math.isclose(m["val_loss"], m["val_nll"])


def test_divergence_raises(tiny_data):
    with pytest.raises(train.DivergedError, match="epoch 1"):
        train.fit(RunConfig(optimizer="sgd", lr=1e12, epochs=2, subset=600), tiny_data)


def test_config_defaults_and_validation():
    config = RunConfig(optimizer="sgd", model="model2")
    assert (config.lr, config.momentum, config.dropout) == (0.05, 0.9, 0.5)
    assert config.device == ("cuda" if torch.cuda.is_available() else "cpu")  # what "auto" resolves to
    assert config.to_params()["lr"] == 0.05
    no_gpu = () if torch.cuda.is_available() else ({"device": "cuda"},)
    for bad in ({"lr": 0}, {"dropout": 1.0}, {"epochs": 0}, {"batch_size": 0}, {"model": "model9"},
                {"model": "model1", "dropout": 0.2}, *no_gpu):
        with pytest.raises(ConfigError):
            RunConfig(**bad)
