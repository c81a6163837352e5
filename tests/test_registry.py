"""`fmnist register` and `fmnist predict`, loading a registered model elsewhere, and serving it over REST."""

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import VENV_BIN, cli_env, free_port, stop, wait_http
from fmnist_mlflow.cli import main as cli
from fmnist_mlflow.training import data
from fmnist_mlflow.tracking import registry
from fmnist_mlflow.tracking.fit import tracked_fit
from fmnist_mlflow.training.config import RunConfig
from fmnist_mlflow.tracking import experiment as experiments


def invoke(*args):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


@pytest.fixture
def two_runs(store, tiny_data):
    """Two real tracked runs, the first clearly better on validation (more epochs, sensible lr)."""
    experiments.use_experiment("fmnist")
    good = tracked_fit(RunConfig(epochs=3, subset=600), tiny_data)
    bad = tracked_fit(RunConfig(optimizer="sgd", lr=1e-5, epochs=1, subset=600), tiny_data)
    assert good.final["val_accuracy"] > bad.final["val_accuracy"]
    return good, bad


def test_register_picks_best_by_validation_and_logs_the_test_evaluation(two_runs):
    good, bad = two_runs
    result = invoke("register")
    assert result.exit_code == 0, result.output
    version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
    assert version.tags["source_run_id"] == good.run_id
    run = mlflow.get_run(good.run_id)
    # the training run holds its training alone: its charts are its epoch curves
    assert not [k for k in run.data.metrics if k.startswith("test_") or "per_class" in k]
    # the evaluation is a run of its own, nested under the training run, with the model and the test set as
    # its inputs and the test metrics linked to both (MLflow 3's pattern)
    (evaluation,) = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"tags.`mlflow.parentRunId` = '{good.run_id}'")
    assert evaluation.data.tags["fmnist.kind"] == "evaluation" and evaluation.info.status == "FINISHED"
    assert evaluation.info.run_name == f"{run.info.run_name}-test"
    assert {"test_accuracy", "test_loss", "test_nll"} == set(evaluation.data.metrics)
    assert 0.1 < evaluation.data.metrics["test_accuracy"] < 1
    assert float(version.tags["test_accuracy"]) == pytest.approx(evaluation.data.metrics["test_accuracy"], abs=1e-6)
    (model,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                           filter_string=f"source_run_id = '{good.run_id}'")
    inputs = mlflow.get_run(evaluation.info.run_id).inputs
    assert [i.model_id for i in inputs.model_inputs] == [model.model_id]
    assert [d.dataset.name for d in inputs.dataset_inputs] == ["fashion-mnist-test"]
    linked = {m.key: m for m in mlflow.get_logged_model(model.model_id).metrics}
    assert linked["test_accuracy"].run_id == evaluation.info.run_id
    assert linked["test_accuracy"].dataset_name == "fashion-mnist-test"
    # the registered version is linked to its logged model: the Models view's "Registered models" column
    # reads the model's mlflow.modelVersions tag (a sqlite registry keeps no model_id on the version)
    assert version.source == f"models:/{model.model_id}"
    assert json.loads(mlflow.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "fmnist-cnn", "version": version.version}]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(evaluation.info.run_id)}
    assert artifacts == {"confusion_matrix.png", "misclassified.png", "per_class.csv", "per_class.md",
                         "per_class_accuracy.png"}
    table = mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/per_class.md")
    assert table.count("\n") == 12 and "| Trouser |" in table
    # no MLflow chatter about the registered model, no "(previous None)" on a new store
    assert "already exists" not in result.output and "Creating a new version" not in result.output
    assert "previous None" not in result.output and "first holder" in result.output
    assert "uint8" not in version.description and "float32" in version.description
    assert run.info.status == "FINISHED"  # evaluating did not reopen the run
    assert f"{100 * evaluation.data.metrics['test_accuracy']:.2f}%" in result.output
    assert "view it: mlflow ui --backend-store-uri" in result.output and good.run_id in result.output
    again = invoke("register")  # evaluated once: a second register reuses the evaluation run
    assert again.exit_code == 0, again.output
    assert len(mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{good.run_id}'")) == 1


def test_alias_does_not_move_to_a_worse_version_without_force(two_runs):
    good, bad = two_runs
    assert invoke("register").exit_code == 0
    result = invoke("register", "--run-id", bad.run_id)
    assert result.exit_code == 0 and "not moved" in result.output
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias("fmnist-cnn", "champion").tags["source_run_id"] == good.run_id
    result = invoke("register", "--run-id", bad.run_id, "--force")
    assert result.exit_code == 0 and "(forced)" in result.output
    assert client.get_model_version_by_alias("fmnist-cnn", "champion").tags["source_run_id"] == bad.run_id
    history = registry.alias_history("fmnist-cnn", "champion")
    assert [(h["version"], h["previous"]) for h in history] == [("1", None), ("2", "1")]
    assert "forced" in history[1]["reason"]
    # registering the same run again reuses its version and does not evaluate twice
    assert invoke("register", "--run-id", bad.run_id).exit_code == 0
    assert len(client.search_model_versions("name = 'fmnist-cnn'")) == 2
    # a registry that cannot say who holds the alias is an error, never "no holder yet": the alias stays
    import sqlite3

    with sqlite3.connect(mlflow.get_tracking_uri()[len("sqlite:///"):]) as db:
        db.execute("ALTER TABLE registered_model_aliases RENAME TO broken_aliases")
    failed = CliRunner().invoke(cli.main, ["register", "--run-id", good.run_id])
    assert failed.exit_code == 1 and "Traceback" not in failed.output, failed.output
    assert "no such table: registered_model_aliases" in failed.output
    with sqlite3.connect(mlflow.get_tracking_uri()[len("sqlite:///"):]) as db:
        db.execute("ALTER TABLE broken_aliases RENAME TO registered_model_aliases")
    assert len(registry.alias_history("fmnist-cnn", "champion")) == 2  # no move recorded
    assert client.get_model_version_by_alias("fmnist-cnn", "champion").tags["source_run_id"] == bad.run_id


def test_predict_png_and_npy_and_its_errors(two_runs, tmp_path):
    good, _ = two_runs
    test = data.load_test()
    Image.fromarray(test.x[0, 0].numpy()).save(tmp_path / "a.png")
    Image.fromarray(test.x[1, 0].numpy()).resize((56, 56)).save(tmp_path / "big.jpg")
    np.save(tmp_path / "batch.npy", test.x[:3].numpy())
    np.save(tmp_path / "wrong.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(cli.main, ["predict", "--model-uri", good.model_uri, "--top-k", "2",
                                           str(tmp_path / "a.png"), str(tmp_path / "big.jpg"), str(tmp_path / "batch.npy")])
    assert result.exit_code == 0, result.output
    model, *lines = result.output.strip().splitlines()
    # which model answered: the logged model and the run it came from
    assert model == f"model: logged model {good.model_uri.split('/')[-1]} ({mlflow.get_run(good.run_id).info.run_name}), run {good.run_id}"
    assert len(lines) == 5 and lines[0].startswith(f"{tmp_path / 'a.png'}: ")
    assert "resized from 56x56 to 28x28" in lines[1] and lines[4].startswith(f"{tmp_path / 'batch.npy'}[2]: ")
    invoke("register")  # the default URI, the champion alias: the version it points at now is named
    result = CliRunner().invoke(cli.main, ["predict", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("model: fmnist-cnn version 1 (alias champion): logged model m-")
    assert f"run {good.run_id}" in result.output.splitlines()[0]

    result = CliRunner().invoke(cli.main, ["predict", "--model-uri", good.model_uri, "--json", str(tmp_path / "a.png"),
                                           str(tmp_path / "wrong.npy"), str(tmp_path / "broken.png"),
                                           str(tmp_path / "missing.png")])
    assert result.exit_code == 1
    assert "wrong.npy: shape (3, 32, 32)" in result.output and "broken.png: not a readable image" in result.output
    assert "missing.png: no such file" in result.output and "Traceback" not in result.output
    payload = json.loads(result.output[result.output.index("["): result.output.rindex("]") + 1])
    assert len(payload) == 1 and len(payload[0]["top_k"]) == 3 and payload[0]["top_k"][0]["class"] in data.CLASS_NAMES

    result = CliRunner().invoke(cli.main, ["predict", "--model-uri", "models:/no-such-model/1", str(tmp_path / "a.png")])
    assert result.exit_code == 1 and "cannot load model models:/no-such-model/1" in result.output


# A user's environment: only torch and mlflow (scripts/setup.sh makes it, with .venv's versions of both).
CLEAN_PYTHON = Path(__file__).resolve().parents[1] / ".venv-clean" / "bin" / "python"
LOAD_ELSEWHERE = """
import sys
sys.modules["fmnist_mlflow"] = None  # the training package must not be needed (and is not installed there)
import json, mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model("models:/fmnist-cnn@champion")
x = np.load(sys.argv[1]).astype(np.float32) / 255  # floats in [0, 1], as torchvision holds images
names = model.metadata.metadata["class_names"]
# MLflow's classifier evaluation on the champion as it is, as the README shows it
data = pd.DataFrame({"image": list(x.reshape(len(x), -1)), "label": [names[i] for i in np.load(sys.argv[2])]})
mlflow.set_experiment("evaluations")
with mlflow.start_run():
    result = mlflow.models.evaluate("models:/fmnist-cnn@champion", data, targets="label", model_type="classifier",
                                    evaluator_config={"label_list": names})
print(json.dumps({"labels": model.predict(x).tolist(), "logits": model.predict(x, params={"output": "logits"}).values.tolist(),
                  "probabilities": model.predict(x, params={"output": "probabilities"}).to_dict("records"),
                  "classes": names, "accuracy": result.metrics["accuracy_score"]}))
"""


def test_champion_loads_in_a_clean_venv_without_the_package_or_pickle(two_runs, store, tmp_path):
    """MLflow's classifier evaluation on the registered champion, in a venv with only torch and mlflow."""
    if not CLEAN_PYTHON.exists():
        pytest.fail(f"{CLEAN_PYTHON} is missing: run scripts/setup.sh (a venv with only torch and mlflow)")
    installed = subprocess.run([str(CLEAN_PYTHON), "-m", "pip", "list", "--format", "freeze"], capture_output=True,
                               text=True, check=True).stdout
    assert "fmnist" not in installed.lower() and "optuna" not in installed.lower()
    good, _ = two_runs
    assert invoke("register").exit_code == 0
    test = data.load_test()
    x, y = test.x[:40], test.y[:40].numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y)
    with torch.inference_mode():
        expected = good.model(x).numpy()  # the model as it left training
    proc = subprocess.run([str(CLEAN_PYTHON), "-c", LOAD_ELSEWHERE, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True,
                          text=True, timeout=300, cwd=tmp_path,
                          env=cli_env(MLFLOW_TRACKING_URI=store, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(out["logits"]), expected, rtol=1e-4, atol=1e-4)
    assert out["classes"] == list(data.CLASS_NAMES)
    # the default answer is the class name; probabilities beside it on request; MLflow's evaluation agrees
    assert out["labels"] == [data.CLASS_NAMES[i] for i in expected.argmax(1)]
    first = out["probabilities"][0]
    assert first["label"] == out["labels"][0] and sum(first[c] for c in data.CLASS_NAMES) == pytest.approx(1, abs=1e-5)
    assert out["accuracy"] == pytest.approx((expected.argmax(1) == y).mean())


def test_serve_the_champion_over_rest(two_runs, store, tmp_path):
    good, _ = two_runs
    assert invoke("register").exit_code == 0
    port = free_port()
    proc = subprocess.Popen([f"{VENV_BIN}/mlflow", "models", "serve", "-m", "models:/fmnist-cnn@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            env=cli_env(MLFLOW_TRACKING_URI=store), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
        x = data.load_test().x[:5].numpy()
        with torch.inference_mode():
            expected = good.model(torch.from_numpy(x)).numpy()
        np.save(tmp_path / "x.npy", x)
        predicted = json.loads(invoke("predict", "--model-uri", "models:/fmnist-cnn@champion", "--json", "--top-k",
                                      "1", str(tmp_path / "x.npy")).stdout)  # stdout: JSON alone
        # raw uint8 pixels as JSON integers, floats in [0, 1] (torchvision's ToTensor), and floats 0-255
        for inputs in (x.tolist(), (x / 255.0).tolist(), x.astype(float).tolist()):
            response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": inputs}, timeout=60)
            assert response.status_code == 200, response.text
            # the default answer: class names, the same as `fmnist predict`'s first choice
            assert response.json()["predictions"] == [p["top_k"][0]["class"] for p in predicted]
            response = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                     json={"inputs": inputs, "params": {"output": "logits"}})
            assert response.status_code == 200, response.text
            logits = np.array([[row[c] for c in data.CLASS_NAMES] for row in response.json()["predictions"]])
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        # NaN or infinite pixels: refused with a 4xx, never 200 with NaN logits
        for bad in (float("nan"), float("inf")):
            inputs = (x / 255.0).tolist()
            inputs[1][0][3][4] = bad
            body = json.dumps({"inputs": inputs})  # Python writes NaN / Infinity, as a careless client would
            response = requests.post(f"http://127.0.0.1:{port}/invocations", data=body, timeout=60,
                                     headers={"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (bad, response.status_code, response.text[:300])
            assert "pixels must be finite numbers" in response.text
        # pixels outside [0, 255]: refused by the model's graph too (they gave logits near 1e28 with HTTP 200)
        for bad in (-1e6, 1e30, 256.0):
            inputs = x.astype(float).tolist()
            inputs[0][0][5][5] = bad
            response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": inputs}, timeout=60)
            assert 400 <= response.status_code < 500 and "pixels must lie in [0, 255]" in response.text, bad
            # MLflow's scoring server writes the body of a model's error: its own message, and a stack trace
            # (README, "Serve the champion"); the model's words are in the trace's last line
            assert response.json()["error_code"] == "BAD_REQUEST"
        # an empty batch: MLflow's scoring server answers before the model sees it (README documents it)
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": []}, timeout=60)
        assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "Failed to enforce schema" in response.json()["message"]
        response = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                 json={"inputs": np.zeros((2, 1, 32, 32)).tolist()})  # the wrong size
        assert response.status_code == 400 and response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "Failed to enforce schema" in response.json()["message"] and "shape" in response.json()["message"]
    finally:
        stop(proc)
