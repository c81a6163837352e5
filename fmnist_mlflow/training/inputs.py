"""Images and arrays read for a model (`fmnist predict`), and its logits turned into classes.

Inputs: PNG/JPEG images (converted to 28x28 grayscale; a note says when one was resized) and `.npy`
arrays of shape (28, 28), (N, 28, 28) or (N, 1, 28, 28): uint8, or numbers in [0, 255] (raw pixels) or [0, 1],
each image's scale told by its brightest pixel, as the logged model reads them; NaN, infinite and
out-of-range pixels are refused in the model's words. Fashion-MNIST
images are light garments on a black background; photos of dark garments on white need inverting first.
Each input that cannot be read gives an `InputError` naming it; the others are still classified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import CLASS_NAMES
from ..errors import FmnistError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXEL_MAX = 255.0  # models.PIXEL_MAX, without importing torch


class InputError(FmnistError, ValueError):
    """An input could not be turned into (N, 1, 28, 28) uint8 images; the message names it."""


@dataclass(frozen=True)
class Batch:
    source: str
    images: np.ndarray  # (N, 1, 28, 28) uint8
    note: str = ""


def read_input(path: str) -> Batch:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path}: is a folder; give image or .npy files (e.g. {path.rstrip('/')}/*.png)")
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _read_array(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_image(path)
    raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use .png, .jpg, .jpeg or .npy")


def _read_image(path: str) -> Batch:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL only warns for images between its pixel limit and twice it: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            gray = image.convert("L")
            note = ""
            if gray.size != (28, 28):
                note = f"resized from {gray.size[0]}x{gray.size[1]} to 28x28"
                gray = gray.resize((28, 28), Image.Resampling.LANCZOS)
            pixels = np.array(gray, dtype=np.uint8)  # a writable copy
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: refused, too many pixels for an image to classify ({exc})") from None
    return Batch(path, pixels.reshape(1, 1, 28, 28), note)


def _read_array(path: str) -> Batch:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty or truncated file
        raise InputError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc or 'empty file'})") from None
    shape = array.shape  # as the file has it: what a message names
    if array.ndim and len(array) == 0:
        raise InputError(f"{path}: shape {shape} holds no image")
    if array.shape == (28, 28):
        array = array[None]
    if array.ndim == 3 and array.shape[1:] == (28, 28):
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != (1, 28, 28):
        raise InputError(f"{path}: shape {shape} is not (28, 28), (N, 28, 28) or (N, 1, 28, 28)")
    if array.dtype == np.uint8:
        return Batch(path, array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{path}: dtype {array.dtype} is not numeric; expected uint8 0-255 or floats in [0, 1]")
    # what the logged model accepts (models.Normalize), refused in the model's words
    if not np.isfinite(array).all():
        raise InputError(f"{path}: pixels must be finite numbers (got NaN or infinity)")
    if array.min() < 0 or array.max() > PIXEL_MAX:
        raise InputError(f"{path}: pixels must lie in [0, 255] (raw values) or [0, 1]; "
                         f"this {array.dtype} array holds {array.min()}..{array.max()}")
    # each image's scale told by its brightest pixel, as the model does: above 1 is 0-255, else [0, 1]
    raw = array.reshape(len(array), -1).max(axis=1) > 1
    scaled = np.where(raw[:, None, None, None], array, np.asarray(array, dtype=np.float64) * PIXEL_MAX)
    note = "" if raw.all() else "scaled from [0, 1] floats"
    return Batch(path, np.round(scaled).astype(np.uint8), note)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int, class_names=CLASS_NAMES) -> list:
    """Per image, the k most likely classes as [{"class": name, "probability": p}], most likely first."""
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[{"class": class_names[j], "probability": float(row[j])} for j in idx]
            for row, idx in zip(probabilities, order)]
