import gzip
import shutil

import pytest
import torch

from fmnist_mlflow.training import data


def copy_dataset(dest, decompress=False):
    folder = data.locate()
    for name in data.FILES:
        src = data._find(folder, name)
        if decompress or src.suffix != ".gz":
            raw = data.read_verified(folder, name)
            (dest / name).write_bytes(raw)
        else:
            shutil.copy(src, dest / src.name)
    return dest


def test_verify_finds_all_four_files():
    found = data.verify()
    assert set(found) == set(data.FILES)


def test_split_is_deterministic_and_disjoint():
    train_a, val_a = data.split_indices()
    train_b, val_b = data.split_indices()
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert len(train_a) == 50_000 and len(val_a) == 10_000
    assert len(set(train_a.tolist()) | set(val_a.tolist())) == 60_000


def test_load_gives_uint8_splits_and_subset(tiny_data):
    assert tiny_data.train.x.dtype == torch.uint8 and tiny_data.train.x.shape == (600, 1, 28, 28)
    assert len(tiny_data.val) == 120
    full = data.load()
    assert full.sizes == {"train_size": 50_000, "val_size": 10_000}
    # the subset is a prefix of the same fixed split
    assert torch.equal(full.train.x[:600], tiny_data.train.x)


def test_corrupted_file_is_rejected_with_its_name(tmp_path):
    copy_dataset(tmp_path, decompress=True)
    target = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte is corrupt"):
        data.load(tmp_path)


def test_truncated_gzip_is_rejected_with_its_name(tmp_path):
    copy_dataset(tmp_path)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(data.read_verified(tmp_path, "t10k-labels-idx1-ubyte"))[:-200])
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.verify(tmp_path)


def test_no_source_lists_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(data.DataError) as err:
        data.locate(tmp_path, download=False)
    assert "--data-dir" in str(err.value) and "apt-get install" in str(err.value) and "torchvision" in str(err.value)


def test_a_gzip_body_with_overwritten_bytes_is_one_line_naming_the_file(tmp_path):
    """Bytes overwritten inside the compressed stream make zlib fail (not a truncation): one line, exit 1."""
    from click.testing import CliRunner

    from fmnist_mlflow.cli import main as cli

    copy_dataset(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[5000:5016] = b"\xff" * 16
    target.write_bytes(bytes(raw))
    result = CliRunner().invoke(cli.main, ["data", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "train-images-idx3-ubyte.gz is unreadable, truncated or corrupt" in result.output
