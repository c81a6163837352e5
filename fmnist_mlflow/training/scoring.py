"""The held-out test evaluation of a selected model (`score`): metrics, per-class accuracy and figures.

It works on any callable that maps uint8 images `(N, 1, 28, 28)` to logits `(N, 10)` (a model loaded
back from MLflow, so what is evaluated is exactly what gets registered). Losses are per-example means.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .data import CLASS_NAMES, Split
from .train import EVAL_BATCH, NUM_CLASSES, loss_fn


def predict_logits(predict: Callable, x: torch.Tensor) -> torch.Tensor:
    # torch.tensor copies: a loaded pyfunc can return a read-only array, which torch.as_tensor would share
    # (with a UserWarning in the command's output)
    chunks = [torch.tensor(np.asarray(predict(x[i : i + EVAL_BATCH].numpy()))) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(chunks).float()


def score(predict: Callable, test: Split, loss: str) -> dict:
    """Test metrics of a model: `test_accuracy`, `test_loss` (the trained loss), `test_nll`, plus the
    confusion matrix (rows: true class, columns: predicted) and the predictions."""
    logits = predict_logits(predict, test.x)
    y = test.y
    pred = logits.argmax(dim=1)
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = (confusion.diag().float() / confusion.sum(dim=1).clamp(min=1)).tolist()
    return {
        "test_accuracy": (pred == y).float().mean().item(),
        "test_loss": loss_fn(loss, logits, y).item(),
        "test_nll": F.cross_entropy(logits, y).item(),
        "per_class_accuracy": dict(zip(CLASS_NAMES, per_class)),
        "confusion": confusion.numpy(),
        "predictions": pred.numpy(),
        "probabilities": F.softmax(logits, dim=1).numpy(),
    }


def inference_cost(model: torch.nn.Module, rounds: int = 20) -> dict:
    """What a model costs to run on this machine's CPU, in this process's threads: its weights, and the
    median milliseconds per image at batch 1 and at batch 256 (float32 input, as served). `model` is on the
    CPU and ready for inference (a model loaded from MLflow, or one in eval mode)."""
    import statistics
    import time

    out = {"parameters": sum(p.numel() for p in model.parameters())}
    for batch in (1, 256):
        x = torch.rand(batch, 1, 28, 28)
        times = []
        with torch.inference_mode():
            model(x)  # warm-up: first-call allocations and kernel choice
            for _ in range(rounds):
                started = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - started)
        out[f"ms_per_image_batch{batch}"] = 1000 * statistics.median(times) / batch
    return out
