"""The training core: `fit(config, data, on_epoch_end)` -> `FitResult`; `evaluate(model, split, loss)` -> dict.

It knows nothing of MLflow or Optuna: trackers and pruners plug in through `on_epoch_end`, which receives
each epoch's metrics and may raise to stop the run. Speed comes from keeping each split in one tensor on
the device and slicing batches with a per-epoch random permutation (no per-sample DataLoader, no
per-sample transforms), channels-last convolutions, and losses accumulated on the device so that CUDA
is synchronised once per epoch, not once per step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypedDict

import torch
from torch import nn
from torch.nn import functional as F

from . import models
from .config import RunConfig
from .data import Dataset, Split
from ..errors import FmnistError

EVAL_BATCH = 2048  # images per evaluation batch: large, since no gradients are kept
NUM_CLASSES = 10



class EpochMetrics(TypedDict):
    """One epoch's metrics: what `fit` reports, MLflow logs (per step = epoch) and `tracking.queries.history` reads back."""

    epoch: int  # 1-based
    train_loss: float  # per-example mean of the trained loss, as measured during the epoch
    val_loss: float  # the same loss on the validation split
    val_nll: float  # negative log-likelihood on validation: comparable across CE and BCE
    val_accuracy: float  # a fraction in [0, 1]
    epoch_seconds: float  # wall time of the training pass


EpochCallback = Callable[[EpochMetrics], None]
BatchCallback = Callable[[int, int], None]  # (batches done, batches per epoch)


class DivergedError(FmnistError, RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class FitResult:
    model: nn.Module  # what was validated and is to be logged (see `served`), in eval mode, on the training device
    trained: nn.Module  # the optimizer's own weights (the same module as `model` without ema and tta)
    history: list[EpochMetrics] = field(default_factory=list)

    @property
    def final(self) -> EpochMetrics:
        return self.history[-1]


def loss_fn(name: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean",
            label_smoothing: float = 0.0) -> torch.Tensor:
    """CE on class indices, or BCE-with-logits on one-hot targets (averaged over the 10 outputs too)."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=label_smoothing)
    target = F.one_hot(y, NUM_CLASSES).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
    return loss.mean() if reduction == "mean" else loss.sum()


def make_optimizer(config: RunConfig, params) -> torch.optim.Optimizer:
    wd = config.weight_decay
    if config.optimizer == "adam":
        # AdamW decouples the decay from Adam's per-weight scaling (with Adam's L2 it barely acts);
        # plain Adam when there is none keeps the report's grid on the exact same code path.
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=wd) if wd else torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=wd)
    return torch.optim.RMSprop(params, lr=config.lr, weight_decay=wd)


def make_schedule(config: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """A per-batch learning-rate scheduler, or None for the constant rate."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    if config.schedule == "onecycle":
        # Peak = config.lr; momentum is not cycled, so the three optimizers keep their own momentum settings.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total,
                                                   pct_start=config.warmup, cycle_momentum=False)
    return None


SHIFT = 2  # pixels: "flip-shift" moves each image by up to this much in x and y


def augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Batch augmentation on the device, one random draw per image; uint8 stays uint8."""
    n = x.shape[0]
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if kind == "flip-shift":
        side = x.shape[-1]
        padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
        dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(side, device=x.device))[:, :, None]  # (n, side, 1)
        cols = (dx[:, None] + torch.arange(side, device=x.device))[:, None, :]  # (n, 1, side)
        x = padded[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    return x


def prepare_model(config: RunConfig) -> nn.Module:
    """The config's network on its device. Call inside `seeded(config)`: the seed gives the initial weights."""
    model = models.build(config.model, config.dropout, config.width)
    return model.to(config.device, memory_format=torch.channels_last)


@contextlib.contextmanager
def seeded(config: RunConfig):
    """Run a fit on the config's seed (initial weights, dropout masks) without touching the caller's random
    state or cuDNN settings: both are restored when it ends."""
    devices = [torch.cuda.current_device()] if config.device == "cuda" else []
    benchmark = torch.backends.cudnn.benchmark
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        # fixed input shapes: on CUDA let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = config.device == "cuda" or benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = benchmark


def averaged(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of `model`'s weights, updated after every optimizer step."""
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))


def served(config: RunConfig, net: nn.Module) -> nn.Module:
    """What is validated, logged and served: `net` (the trained or the averaged weights), mirrored too
    when `config.tta`."""
    return models.FlipTTA(net) if config.tta else net


def autocast(config: RunConfig):
    """bf16 autocast of the forward pass when asked for; a no-op context in fp32."""
    return torch.autocast(config.device, dtype=torch.bfloat16, enabled=config.precision == "bf16")


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, loss: str, batch_size: int = EVAL_BATCH) -> dict:
    """Per-example means over the split: the trained `loss`, `nll` (softmax cross-entropy, comparable
    across losses) and `accuracy` in [0, 1]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device)
    total_nll = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device, non_blocking=True)
        y = split.y[start : start + batch_size].to(device, non_blocking=True)
        logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        total_loss += loss_fn(loss, logits, y, reduction="sum")
        total_nll += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    model.train(was_training)
    n = len(split)
    return {"loss": total_loss.item() / n, "nll": total_nll.item() / n, "accuracy": correct.item() / n}


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Split,
    config: RunConfig,
    generator: torch.Generator,
    on_batch: Optional[BatchCallback] = None,
    scheduler=None,
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None,
) -> float:
    """One pass over `split` in a random order; returns the per-example mean training loss."""
    model.train()
    n = len(split)
    steps = math.ceil(n / config.batch_size)
    perm = torch.randperm(n, device=split.x.device, generator=generator)
    total = torch.zeros((), device=split.x.device)
    for step in range(steps):
        idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
        x = split.x[idx]
        if config.augment != "none":
            x = augment(x, config.augment, generator)
        x = x.contiguous(memory_format=torch.channels_last)
        y = split.y[idx]
        with autocast(config):
            logits = model(x)
        loss = loss_fn(config.loss, logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.detach() * len(idx)  # stays on the device: no per-step synchronisation
        if on_batch is not None:
            on_batch(step + 1, steps)
    return total.item() / n


def fit(
    config: RunConfig,
    data: Dataset,
    on_epoch_end: Optional[EpochCallback] = None,
    on_batch: Optional[BatchCallback] = None,
) -> FitResult:
    """Train `config` on `data.train`, validating on `data.val` after every epoch.

    `on_epoch_end` gets each epoch's `EpochMetrics`. Raises `DivergedError` on a non-finite loss or
    non-finite validation metrics (a model that ends NaN must never pass for a finished run).
    """
    with seeded(config):
        return _fit(config, data.to(config.device), on_epoch_end, on_batch)


def _fit(config: RunConfig, data: Dataset, on_epoch_end: Optional[EpochCallback],
         on_batch: Optional[BatchCallback]) -> FitResult:
    model = prepare_model(config)
    optimizer = make_optimizer(config, model.parameters())
    scheduler = make_schedule(config, optimizer, math.ceil(len(data.train) / config.batch_size))
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    ema = averaged(model, config.ema) if config.ema else None
    evaluated = served(config, ema.module if ema is not None else model)
    result = FitResult(model=evaluated, trained=model)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_loss = train_epoch(model, optimizer, data.train, config, generator, on_batch, scheduler, ema)
        seconds = time.perf_counter() - started  # .item() in train_epoch has synchronised the device
        if not math.isfinite(train_loss):
            raise DivergedError(
                f"training loss became {train_loss} in epoch {epoch} "
                f"({config.optimizer}, lr={config.lr:g}); try a smaller learning rate"
            )
        val = evaluate(evaluated, data.val, config.loss)
        if not (math.isfinite(val["loss"]) and math.isfinite(val["nll"])):
            raise DivergedError(
                f"validation loss became {val['nll']} after epoch {epoch} "
                f"({config.optimizer}, lr={config.lr:g}): the weights are not finite; try a smaller learning rate"
            )
        metrics = EpochMetrics(epoch=epoch, train_loss=train_loss, val_loss=val["loss"], val_nll=val["nll"],
                               val_accuracy=val["accuracy"], epoch_seconds=seconds)
        result.history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    model.eval()
    evaluated.eval()
    return result
