"""Logged models and the model registry in MLflow: log a trained model (a torch.export program served by
`served_classifier.py`, with its signature and metadata), find a run's model, register a version, move an
alias, keep an alias's history.

Models are logged from a CPU copy as MLflow's "models from code": the network a `torch.export` program with
float32 input, and the code that serves it (`served_classifier.py`) stored beside it, so that they load and
serve anywhere with torch and MLflow alone, without this package or pickle. What they answer (class names
by default; probabilities or logits on request) is the contract MLflow's classifier tooling and REST
clients take.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import mlflow
import numpy as np
import torch

from ..schema import VERSION_SOURCE_RUN
from ..training import inputs
from ..training.data import CLASS_NAMES
from .queries import client

MISSING = "RESOURCE_DOES_NOT_EXIST"  # MLflow's error code for a name, version or alias that is not there

MODEL_ARTIFACT = "model"
SERVED_CODE = str(Path(__file__).with_name("served_classifier.py"))
PROGRAM = "program"  # the model's artifact holding the torch.export program

EXAMPLE_BATCH = 4  # > 1 so that torch.export keeps the batch dimension dynamic

MODEL_INPUT = ("float32 images (N, 1, 28, 28): pixels in [0, 1], or raw 0-255 values (each image's scale is told "
               "by its brightest pixel); normalised inside the model")
MODEL_OUTPUT = ('the predicted class names; params {"output": "probabilities"}: "label" and a '
                'probability column per class; {"output": "logits"}: a logit column per class')


def signature():
    """Tensor input, one string column out by default, and the `output` param that asks for more."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
                          outputs=Schema([ColSpec(DataType.string, "label")]),
                          params=ParamSchema([ParamSpec("output", DataType.string, "label")]))


def export(model: torch.nn.Module):
    """The trained network as a `torch.export` program on the CPU, any batch size."""
    example = torch.zeros((EXAMPLE_BATCH, 1, 28, 28), dtype=torch.float32)
    return torch.export.export(_cpu_copy(model), (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def log_model(model: torch.nn.Module, extra_metadata: Optional[dict] = None, *, name: str = MODEL_ARTIFACT,
              params: Optional[dict] = None, metrics: Optional[dict] = None, step: Optional[int] = None,
              dataset=None) -> str:
    """Log the model (MLflow's models from code: `served_classifier.py` serving a torch.export program);
    returns its `models:/m-...` URI. Input: float32 images (N, 1, 28, 28), any N, in [0, 1] or raw 0-255
    pixels. float32, not uint8: a served model casts the JSON it receives to the signature's dtype, and
    uint8 would turn [0, 1] floats into blank images. Output: MODEL_OUTPUT, classes in `class_names` order.
    """
    import warnings

    metadata = {"class_names": list(CLASS_NAMES), "input": MODEL_INPUT, "output": MODEL_OUTPUT, **(extra_metadata or {})}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # MLflow's advice to log an input example, at every model: left out on purpose (below)
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        program = os.path.join(folder, "model.pt2")
        torch.export.save(export(model), program)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=SERVED_CODE,
            artifacts={PROGRAM: program},
            model_config={"class_names": list(CLASS_NAMES)},
            signature=signature(),
            params={k: str(v) for k, v in (params or {}).items()},
            # Explicit requirements: inferring them would load the model again in a subprocess. No input
            # example: MLflow would load the saved model back and predict it at every log (0.3 s a run);
            # the tests load, evaluate and serve logged models instead.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            metadata=metadata,
        )
    if metrics:
        mlflow.log_metrics(metrics, step=step, model_id=info.model_id, dataset=dataset)
    return info.model_uri


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()


def network(uri: str) -> torch.nn.Module:
    """The torch network a logged model serves (its weights, its cost per image): the program inside a model
    from code, or a model logged before 2026-12-05 in MLflow's pytorch flavour."""
    loaded = load_pyfunc(uri)
    if "pytorch" in loaded.metadata.flavors:
        return mlflow.pytorch.load_model(uri)
    return loaded.unwrap_python_model().program


def logits(loaded, images: np.ndarray) -> np.ndarray:
    """The logits (N, 10) of a loaded model: asked for by the `output` param, or what a model logged before
    it had one (MLflow's pytorch flavour) answers by default."""
    if _has_output_param(loaded):
        return loaded.predict(model_input(loaded, images), params={"output": "logits"}).to_numpy()
    return np.asarray(loaded.predict(model_input(loaded, images)))


def _has_output_param(loaded) -> bool:
    params = loaded.metadata.get_params_schema()
    return params is not None and "output" in [p.name for p in params.params]


def logged_model(run_id: str):
    """The logged model of a run (MLflow 3 keeps it with its own id), or None."""
    experiment = client().get_run(run_id).info.experiment_id
    # source_run_id: MLflow's own field of a logged model (not our version tag of the same name)
    models = mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    return models[0] if models else None


def model_uri(run_id: str) -> str:
    """The URI of the model a run logged."""
    model = logged_model(run_id)
    return f"models:/{model.model_id}" if model else f"runs:/{run_id}/{MODEL_ARTIFACT}"


def load_pyfunc(uri: str):
    return mlflow.pyfunc.load_model(uri)


REGISTERED_MODEL_DESCRIPTION = (
    "Fashion-MNIST CNNs trained and selected by fmnist-mlflow (validation split, never the test set). "
    "Each version's description and tags give its config, seeds and test accuracy over seeds.")


def register_model_version(run_id: str, name: str, tags: dict, description: str = "") -> str:
    """The version of `name` holding this run's model (the existing one if registered before, its tags and
    description brought up to date), else a new one."""
    c = client()
    if not _registered(name):
        try:
            c.create_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
        except mlflow.exceptions.MlflowException:
            if not _registered(name):  # else: created by another process at the same moment
                raise
    model = logged_model(run_id)
    for version in c.search_model_versions(f"name = '{name}'"):
        if version.tags.get(VERSION_SOURCE_RUN) == run_id:
            for key, value in tags.items():
                c.set_model_version_tag(name, version.version, key, value)
            if description:
                c.update_model_version(name, version.version, description=description)
            _link(model, name, version.version)
            return str(version.version)
    # The client's call, not mlflow.register_model, which prints "already exists. Creating a new version"
    # on every registration after the first.
    source = f"models:/{model.model_id}" if model else f"runs:/{run_id}/{MODEL_ARTIFACT}"
    version = c.create_model_version(name, source, run_id=run_id, tags=tags, description=description or None,
                                     model_id=model.model_id if model else None)
    # Another `fmnist register` may have registered the same run at the same moment: of the versions of this
    # run, the lowest stands (each process checks after its own create, so both see it) and the others go.
    same = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'")
                  if v.tags.get(VERSION_SOURCE_RUN) == run_id)
    if same and same[0] != int(version.version):
        c.delete_model_version(name, version.version)
        return register_model_version(run_id, name, tags, description)  # brings the standing one up to date
    _link(model, name, version.version)
    return str(version.version)


def _link(model, name: str, version) -> None:
    """Record the version on its logged model, as `mlflow.register_model` does: the Models view's
    "Registered models" column reads the logged model's `mlflow.modelVersions` tag (a sqlite-backed
    registry does not keep the version's own `model_id`)."""
    if model is None:
        return
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(client().get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in linked):
        client().set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            linked + [{"name": name, "version": version}])})


def version_model_id(version) -> Optional[str]:
    """The logged model a version holds: its `model_id` where the registry keeps it, else its source."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def _registered(name: str) -> bool:
    """Whether the registry holds `name`; a registry that fails raises (never "not there")."""
    try:
        client().get_registered_model(name)
        return True
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == MISSING:
            return False
        raise


def alias_version(name: str, alias: str):
    """The version the alias points at, or None when the model or the alias does not exist. A registry that
    fails raises: the caller must not take a failed read for "no holder yet" and move the alias."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in (MISSING, "INVALID_PARAMETER_VALUE") and _alias_absent(name, alias):
            return None
        raise


def _alias_absent(name: str, alias: str) -> bool:
    """Whether the registry says plainly that `name` has no `alias` (or no such model)."""
    if not _registered(name):
        return True
    return alias not in (client().get_registered_model(name).aliases or {})


def missing_alias(uri: str) -> Optional[str]:
    """For models:/NAME@ALIAS whose model or alias does not exist in the registry: why, in one sentence."""
    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, _, alias = uri[len("models:/"):].partition("@")
    if not _registered(name):
        return f"no registered model {name!r} in this tracking store yet; run `fmnist register` first"
    if alias_version(name, alias) is None:
        return f"registered model {name!r} has no alias {alias!r}; run `fmnist register` (or give --model-uri)"
    return None


def describe_uri(uri: str) -> str:
    """Which model a URI names, for a person: the registered version an alias points at now, with its
    logged model and run; a logged model's name and run; else the URI itself."""
    if not uri.startswith("models:/"):
        return uri
    ref = uri[len("models:/"):]
    try:
        if "@" in ref:  # NAME@ALIAS
            name, _, alias = ref.partition("@")
            version, pointed = client().get_model_version_by_alias(name, alias), f" (alias {alias})"
        elif "/" in ref:  # NAME/VERSION
            name, _, number = ref.partition("/")
            version, pointed = client().get_model_version(name, number), ""
        if "@" in ref or "/" in ref:
            return (f"{name} version {version.version}{pointed}: logged model {version_model_id(version) or '-'}, "
                    f"run {version.run_id}")
        model = client().get_logged_model(ref)
        return f"logged model {model.model_id} ({model.name}), run {model.source_run_id}"
    except mlflow.exceptions.MlflowException:  # the model loaded; what names it is a courtesy
        return uri


def move_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def model_tag_json(name: str, key: str) -> list:
    if not _registered(name):
        return []
    return json.loads(client().get_registered_model(name).tags.get(key, "[]"))


def append_model_tag_json(name: str, key: str, entry: dict) -> None:
    client().set_registered_model_tag(name, key, json.dumps(model_tag_json(name, key) + [entry]))


def model_input(model, images: np.ndarray) -> np.ndarray:
    """uint8 images as the loaded model's signature wants them: float32 0-255 (models logged since inputs
    became float32), or uint8 (models logged before)."""
    schema = model.metadata.get_input_schema()
    dtype = schema.numpy_types()[0] if schema is not None and schema.is_tensor_spec() else np.float32
    return images.astype(dtype, copy=False)


def classify(model, path: str, k: int, class_names=CLASS_NAMES) -> list:
    """The `k` most likely classes of every image in one input file, by a loaded model (`mlflow.pyfunc`):
    one {"input": path or path[i], "note": ..., "top_k": [...]} per image; InputError if the file cannot be
    read (the model's own words for pixels it refuses)."""
    batch = inputs.read_input(path)
    probabilities = inputs.softmax(logits(model, batch.images))
    return [{"input": path if len(batch.images) == 1 else f"{path}[{i}]", "note": batch.note, "top_k": top}
            for i, top in enumerate(inputs.top_k(probabilities, k, class_names))]
