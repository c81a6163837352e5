import pytest
import torch

from fmnist_mlflow.training import models

# conv1 260 + conv2 5,020 + fc1 16,050 + fc2 510 (model2 adds no weights: dropout has none)
# conv 320 + 18,496 + 73,856, fc1 147,584 + fc2 1,290
PARAMS = {"model1": 21_840, "model2": 21_840, "model3": 241_546}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_shapes_and_parameter_counts(name):
    model = models.build(name, dropout=0.25 if name != "model1" else 0.0).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    for batch in (1, 7):
        x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
        assert model(x).shape == (batch, 10)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_uint8_and_unit_float_inputs_agree(name):
    model = models.build(name, dropout=0.0).eval()
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(model(x), model(x.float() / 255))


def test_model2_has_dropout_between_conv2_and_pooling():
    model = models.build("model2", dropout=0.5)
    assert isinstance(model.drop, torch.nn.Dropout2d) and model.drop.p == 0.5
    assert isinstance(models.build("model1", dropout=0.0).drop, torch.nn.Identity)


@pytest.mark.parametrize("bad, words", [(float("nan"), "finite"), (float("inf"), "finite"), (-1.0, "[0, 255]"),
                                        (255.5, "[0, 255]"), (1e30, "[0, 255]"), (-1e6, "[0, 255]")])
def test_the_model_and_predict_refuse_the_same_pixels_in_the_same_words(tmp_path, bad, words):
    """The accepted range is [0, 255] (raw values) or [0, 1], finite: the model (and so any loader or server
    of it) and `fmnist predict` agree on it, and on each image's scale."""
    import numpy as np

    from fmnist_mlflow.training import inputs

    model = models.build("model1", dropout=0.0).eval()
    x = torch.rand(3, 1, 28, 28)
    x[1, 0, 3, 4] = bad
    with pytest.raises(RuntimeError, match="pixels must") as raised:
        model(x)
    assert words in str(raised.value)
    np.save(tmp_path / "bad.npy", x.numpy())
    with pytest.raises(inputs.InputError, match="pixels must") as refused:
        inputs.read_input(str(tmp_path / "bad.npy"))
    assert words in str(refused.value)
    # what both accept, they read alike: [0, 1] floats, 0-255 floats, 0-255 integers
    good = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    for array in (good.numpy() / 255.0, good.numpy().astype(np.float32), good.numpy().astype(np.int64)):
        np.save(tmp_path / "good.npy", array)
        assert (inputs.read_input(str(tmp_path / "good.npy")).images == good.numpy()).all()
        torch.testing.assert_close(model(torch.from_numpy(array).float()), model(good))
