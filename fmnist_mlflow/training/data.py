"""Fashion-MNIST: find it, verify it, load it once into uint8 tensors, split it the same way every time.

Sources, in order: a data dir (`--data-dir`, else `$FMNIST_DATA_DIR`, else a per-user cache dir); the
files of Debian's `dataset-fashion-mnist` package; torchvision's download into the cache dir. Whatever the
source, the decompressed IDX bytes are checked against the SHA-256 of the original release, so a corrupt
or truncated file is caught before any training. The whole dataset is 55 MB, small enough to live in one
tensor per split (on the GPU too), from which the trainer slices batches.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import SPLIT_SEED, VAL_SIZE
from ..errors import FmnistError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# SHA-256 of the decompressed IDX files of the original release (sizes in bytes for the error message).
FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "Get Fashion-MNIST one of three ways:\n"
    "  1. put the four IDX files (.gz or raw) in a folder and pass --data-dir DIR or set FMNIST_DATA_DIR;\n"
    "  2. on Debian/Ubuntu: apt-get install -y dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist);\n"
    "  3. allow network access so torchvision can download it into the cache dir."
)


class DataError(FmnistError, RuntimeError):
    """Fashion-MNIST could not be found, read or verified; the message says how to fix it."""


@dataclass(frozen=True)
class Split:
    """Images `(N, 1, 28, 28)` uint8 and labels `(N,)` int64, on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    source: str  # the folder the files were read from
    subset: int = 0  # 0: full split

    @property
    def sizes(self) -> dict:
        return {"train_size": len(self.train), "val_size": len(self.val)}

    def to(self, device: str) -> "Dataset":
        return Dataset(self.train.to(device), self.val.to(device), self.source, self.subset)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist-mlflow"


def data_dir(explicit: Optional[str | Path] = None) -> Path:
    """The user's data dir: the explicit one, else $FMNIST_DATA_DIR, else the per-user cache dir."""
    return Path(explicit or os.environ.get("FMNIST_DATA_DIR") or cache_dir())


def locate(explicit: Optional[str | Path] = None, download: bool = True) -> Path:
    """The first folder holding all four files, trying each source in order (contents are verified
    when read)."""
    first = data_dir(explicit)
    named = explicit or os.environ.get("FMNIST_DATA_DIR")
    # torchvision's download lands in <root>/FashionMNIST/raw. A folder the user named is the only place
    # looked at (then downloaded into): silently reading Debian's copy instead would hide a wrong path.
    for folder in (first, first / "FashionMNIST" / "raw", *(() if named else (DEBIAN_DIR,))):
        if all(_find(folder, name) for name in FILES):
            return folder
    if named and not Path(named).is_dir():
        what = "--data-dir" if explicit else "$FMNIST_DATA_DIR"
        state = "is a file, not a folder" if Path(named).exists() else "does not exist"
        raise DataError(f"data dir {named} ({what}) {state}.\n{HOW_TO_GET}")
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(first), train=True, download=True)
            FashionMNIST(str(first), train=False, download=True)
        except Exception as exc:  # torchvision raises many kinds (URLError, RuntimeError, ...)
            raise DataError(
                f"Fashion-MNIST was not found in {first} or {DEBIAN_DIR}, and torchvision's download failed "
                f"({type(exc).__name__}: {exc}).\n{HOW_TO_GET}"
            ) from None
        return locate(first / "FashionMNIST" / "raw", download=False)
    raise DataError(f"Fashion-MNIST was not found in {first} or {DEBIAN_DIR}.\n{HOW_TO_GET}")


def _find(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_verified(folder: Path, name: str) -> bytes:
    """The decompressed bytes of one IDX file, checked against the original release's SHA-256."""
    path = _find(folder, name)
    if path is None:
        raise DataError(f"{folder / name}[.gz] is missing.\n{HOW_TO_GET}")
    expected_sha, expected_size = FILES[name]
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:  # zlib.error: bytes overwritten inside
        raise DataError(f"{path} is unreadable, truncated or corrupt ({exc}); delete it and get it again.\n"
                        f"{HOW_TO_GET}") from None
    if len(raw) != expected_size or hashlib.sha256(raw).hexdigest() != expected_sha:
        raise DataError(
            f"{path} is corrupt: its contents ({len(raw):,} bytes) do not match the original Fashion-MNIST "
            f"file ({expected_size:,} bytes, sha256 {expected_sha[:12]}...); delete it and get it again.\n"
            f"{HOW_TO_GET}"
        )
    return raw


def verify(data_dir: Optional[str | Path] = None) -> dict:
    """Locate and verify all four files; returns {file name: path} for reporting."""
    folder = locate(data_dir)
    for name in FILES:
        read_verified(folder, name)
    return {name: str(_find(folder, name)) for name in FILES}


def _parse_idx(raw: bytes) -> np.ndarray:
    # IDX header: two zero bytes, a type code (0x08 = uint8), the number of dims, then big-endian int32 sizes.
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_pair(folder: Path, prefix: str) -> Split:
    images = _parse_idx(read_verified(folder, f"{prefix}-images-idx3-ubyte"))
    labels = _parse_idx(read_verified(folder, f"{prefix}-labels-idx1-ubyte"))
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def split_indices(n: int = 60_000, val_size: int = VAL_SIZE, seed: int = SPLIT_SEED):
    """Train and validation indices: a fixed permutation, independent of any training seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load(data_dir: Optional[str | Path] = None, subset: int = 0) -> Dataset:
    """Train and validation splits of the 60,000 training images. The test set is not loaded here."""
    folder = locate(data_dir)
    full = _load_pair(folder, "train")
    train_idx, val_idx = split_indices(len(full))
    if subset:
        train_idx, val_idx = train_idx[:subset], val_idx[: max(1, subset // 5)]
    return Dataset(
        train=Split(full.x[train_idx], full.y[train_idx]),
        val=Split(full.x[val_idx], full.y[val_idx]),
        source=str(folder),
        subset=subset,
    )


def load_test(data_dir: Optional[str | Path] = None) -> Split:
    """The 10,000 held-out test images: only for evaluating a model already selected on validation."""
    return _load_pair(locate(data_dir), "t10k")
