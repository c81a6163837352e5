import pytest
import torch

from fmnist_mlflow import models

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
