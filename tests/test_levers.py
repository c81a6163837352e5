"""What can still move model3 in 10 epochs: a width multiplier, a moving average of the weights (EMA), flip
test-time augmentation (TTA) in the served model, onecycle's warm-up. They validate at the boundary, train,
log, and the logged model loads and predicts without this package."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import yaml

from conftest import cli_env
from fmnist_mlflow.training import data
from fmnist_mlflow.training import models
from fmnist_mlflow.tracking.fit import tracked_fit
from fmnist_mlflow.training import train
from fmnist_mlflow.training.config import ConfigError, RunConfig
from fmnist_mlflow.studies.space import load_space
from fmnist_mlflow.tracking import connection

BASE = {"name": "levers", "metric": "val_accuracy", "fixed": {"model": "model3", "loss": "ce", "seed": 0},
        "search": {"optimizer": {"choices": ["adam"]}, "lr": {"adam": {"low": 1e-4, "high": 1e-2, "log": True}}}}


def space_with(tmp_path, fixed=None, **search):
    spec = {**BASE, "fixed": {**BASE["fixed"], **(fixed or {})}, "search": {**BASE["search"], **search}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_space(path)


def test_warmup_is_drawn_only_by_onecycle_trials_and_levers_reach_the_config(tmp_path):
    import optuna

    space = space_with(tmp_path, schedule={"choices": ["constant", "onecycle"]}, warmup={"low": 0.1, "high": 0.4},
                       width={"choices": [1, 1.5]}, ema={"choices": [0, 0.999]}, tta={"choices": [False, True]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        config = space.suggest(trial, epochs=1, device="cpu")
        assert ("warmup" in trial.params) == (config.schedule == "onecycle")
        assert config.warmup == trial.params.get("warmup", 0.3)
        assert (config.width, config.ema, config.tta) == (trial.params["width"], trial.params["ema"], trial.params["tta"])
        study.tell(trial, 0.5)
    assert space.params_for({"schedule": "constant", "warmup": "0.3", "width": "1.5", "tta": "True"}) == {
        "schedule": "constant", "width": 1.5, "tta": True}  # MLflow params come back as strings


@pytest.mark.parametrize("values, message", [
    ({"model": "model2", "width": 2.0}, "width applies to model3 only"),
    ({"model": "model3", "width": 0.1}, "width must be in 0.25..4"),
    ({"ema": 1.0}, "ema must be in [0, 1)"),
    ({"tta": "yes"}, "tta must be true or false"),
    ({"schedule": "cosine", "warmup": 0.1}, "warmup applies to the onecycle schedule only"),
    ({"schedule": "onecycle", "warmup": 1.0}, "warmup must be in (0, 1)"),
])
def test_bad_lever_values_in_a_config_are_refused(values, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**values, device="cpu")
    assert message in str(err.value)


def test_model3_width_scales_its_convs_and_keeps_the_family():
    narrow, wide = models.build("model3", 0.0, 1.0), models.build("model3", 0.0, 2.0)
    assert [c.out_channels for c in wide.convs] == [64, 128, 256] and [c.out_channels for c in narrow.convs] == [32, 64, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in wide.convs)
    assert wide.fc1.in_features == 256 * 3 * 3 and wide.fc2.out_features == 10
    assert models.parameter_count(narrow) == 241_546 < models.parameter_count(wide)


LOAD_ELSEWHERE = """
import sys
sys.modules["fmnist_mlflow"] = None  # the training package must not be needed
import json, mlflow, numpy as np, torch
model = mlflow.pyfunc.load_model(sys.argv[1])
x = np.load(sys.argv[2]).astype(np.float32) / 255
logits = {"output": "logits"}
convs = [p for p in model.unwrap_python_model().program.parameters() if p.dim() == 4]
print(json.dumps({"logits": model.predict(x, params=logits).values.tolist(),
                  "mirrored": model.predict(x[..., ::-1].copy(), params=logits).values.tolist(),
                  "channels_last": bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)}))
"""


def test_a_wide_model3_with_ema_and_tta_trains_logs_and_serves_the_averaged_mirrored_model(store, tmp_path, tiny_data):
    config = RunConfig(model="model3", width=1.5, ema=0.9, tta=True, schedule="onecycle", warmup=0.2, epochs=2,
                       subset=600, batch_size=64, device="cpu")
    result = tracked_fit(config, tiny_data)
    run = mlflow.get_run(result.run_id)
    assert {k: run.data.params[k] for k in ("width", "ema", "tta", "warmup")} == {
        "width": "1.5", "ema": "0.9", "tta": "True", "warmup": "0.2"}
    assert isinstance(result.model, models.FlipTTA)  # what was validated is what was logged
    x = data.load_test().x[:6]
    np.save(tmp_path / "x.npy", x.numpy())
    proc = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, result.model_uri, str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=cli_env(MLFLOW_TRACKING_URI=connection.tracking_uri(),
                                      MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    logits, mirrored = np.array(out["logits"]), np.array(out["mirrored"])
    assert out["channels_last"]  # the served convolutions run in the CPU's fast layout (`fmnist bench`: serving)
    untracked = train.fit(config, tiny_data)  # the same run without MLflow: same seed, same steps
    with torch.inference_mode():
        served = result.model(x).numpy()
        averaged = result.model.net(x).numpy()  # the EMA weights without the mirror
        trained = untracked.trained(x).numpy()
    np.testing.assert_allclose(logits, served, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, mirrored, rtol=1e-4, atol=1e-4)  # TTA: an image and its mirror agree
    assert np.abs(logits - averaged).max() > 1e-3  # the mirror changes a net's answer: TTA is in the model
    assert np.abs(averaged - trained).max() > 1e-3  # the logged weights are the average, not the last step's
    assert result.history[-1]["val_accuracy"] == pytest.approx(
        train.evaluate(result.model, tiny_data.val, config.loss)["accuracy"])


def test_inference_cost_counts_weights_and_times_both_batch_sizes():
    from fmnist_mlflow.training import scoring

    cost = scoring.inference_cost(models.FlipTTA(models.build("model3", 0.0, 1.5)).eval(), rounds=2)
    assert cost["parameters"] == 430_730  # the mirror adds no weights
    assert cost["ms_per_image_batch1"] > 0 and cost["ms_per_image_batch256"] > 0
