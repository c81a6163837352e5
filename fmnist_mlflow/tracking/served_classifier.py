"""The Python side of every logged model, stored with it by MLflow's "models from code": MLflow copies this file
into the model and runs it when the model loads, anywhere, with torch, numpy, pandas and MLflow alone (never
this package, never pickle). Nothing here imports fmnist_mlflow, and no module of the package imports this.

The network itself is a `torch.export` program (the model's artifact `program`: the trained CNN with its
input checks, its normalisation and, where logged with it, flip test-time augmentation). `predict` answers:

- by default, the predicted class names (an array of strings): what MLflow's classifier evaluation
  (`mlflow.models.evaluate(..., model_type="classifier")`) and REST clients take as they are;
- with params {"output": "probabilities"}: `label` and one column per class with its probability;
- with params {"output": "logits"}: one column per class with its logit (the network's own output).

Input: float32 images (N, 1, 28, 28), pixels in [0, 1] or raw 0-255 values (the model's signature).
"""

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

OUTPUTS = ("label", "probabilities", "logits")


class FashionClassifier(PythonModel):
    def load_context(self, context):
        self.class_names = list(context.model_config["class_names"])
        # weights in channels_last: oneDNN then runs the convolutions in that layout, 1.6-1.75x faster on a
        # CPU than the exported NCHW layout for model3 (`fmnist bench`: serving); the same logits to rounding
        self.program = torch.export.load(context.artifacts["program"]).module().to(memory_format=torch.channels_last)

    def predict(self, context, model_input: np.ndarray, params=None):  # (MLflow validates by the signature)
        output = (params or {}).get("output") or "label"
        if output not in OUTPUTS:
            raise ValueError(f"params output={output!r}: give one of {', '.join(OUTPUTS)}")
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            logits = self.program(images).float()
        if output == "logits":
            return pd.DataFrame(logits.numpy(), columns=self.class_names)
        probabilities = torch.softmax(logits, dim=1).numpy()
        labels = np.asarray(self.class_names)[probabilities.argmax(axis=1)]
        if output == "label":
            return labels  # an array: REST clients get a list of class names
        return pd.concat([pd.Series(labels, name="label"), pd.DataFrame(probabilities, columns=self.class_names)],
                         axis=1)


set_model(FashionClassifier())
