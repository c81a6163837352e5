"""The report's three CNNs, and a name -> constructor table.

Every model takes raw images `(N, 1, 28, 28)`, uint8 in [0, 255] or float (in [0, 1], or 0-255) and
normalizes inside the module, so a logged model needs no outside preprocessing. Outputs are 10 logits in the
order of `data.CLASS_NAMES` (apply softmax for probabilities).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Mean and std of the Fashion-MNIST training pixels, scaled to [0, 1].
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
PIXEL_MAX = 255.0  # the brightest raw pixel: the accepted input range is [0, 255] (or [0, 1], see Normalize)


class Normalize(nn.Module):
    """Scale to [0, 1], then standardise. uint8 is raw pixels. Floats may be in [0, 1] (torchvision's
    ToTensor) or raw 0-255 values (uint8 images sent to a served model as JSON numbers arrive as floats):
    an image whose brightest pixel is above 1 is on the 0-255 scale. (A 0-255 image that is black up to
    a brightness of 1/255 reads as [0, 1]; no real photo is.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # the training path: data stays uint8 on the device
            x = x.float().div_(255.0)
        else:
            x = x.float()
            # NaN or infinite pixels would give NaN logits; refuse them. The check is an op of the exported
            # graph, so a served model answers such a request with HTTP 400 instead of 200 and NaNs.
            # torch._assert_async is private, but torch.export keeps it in the graph (an `assert` or a Python
            # `if ... raise` on tensor values cannot be exported): torch has no public graph-side check.
            torch._assert_async(torch.isfinite(x).all(), "pixels must be finite numbers (got NaN or infinity)")
            # Outside 0-255 is no image (a pixel of -1e6 or 1e30 gave logits near 1e28): refused the same way.
            torch._assert_async(((x >= 0) & (x <= PIXEL_MAX)).all(),
                                "pixels must lie in [0, 255] (raw values) or [0, 1]")
            x = x * torch.where(x.amax(dim=(1, 2, 3), keepdim=True) > 1.0, 1.0 / 255.0, 1.0)
        return (x - PIXEL_MEAN) / PIXEL_STD


class Model1(nn.Module):
    """pytorch/examples' classic MNIST net: conv-pool-relu twice, then 320 -> 50 -> 10."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.norm = Normalize()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)  # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)  # 12 -> 8, pooled to 4
        # Model2's dropout sits between conv2 and its pooling; Identity keeps model1 free of it.
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.fc1 = nn.Linear(20 * 4 * 4, 50)  # 320 features after two 2x pools of 28x28 with 5x5 kernels
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.drop(self.conv2(x)), 2))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class Model2(Model1):
    """Model1 with Dropout2d between the second conv and its pooling (torch's default rate 0.5)."""

    def __init__(self, dropout: float = 0.5):
        super().__init__(dropout)


MODEL3_CHANNELS = (32, 64, 128)  # at width 1; the report never gave model3's channel counts: these are ours


def model3_channels(width: float) -> tuple:
    """The three convs' output channels at a width multiplier (rounded to whole channels)."""
    return tuple(max(1, round(c * width)) for c in MODEL3_CHANNELS)


class Model3(nn.Module):
    """Three same-padded 3x3 convs, 32 -> 64 -> 128 channels (times `width`), each pooled; then
    (last channels x 3 x 3) -> 128 -> 10 (1152 at width 1)."""

    def __init__(self, dropout: float = 0.0, width: float = 1.0):
        super().__init__()
        self.norm = Normalize()
        channels = model3_channels(width)
        self.convs = nn.ModuleList(
            [nn.Conv2d(cin, cout, kernel_size=3, padding=1) for cin, cout in zip((1, *channels[:-1]), channels)]
        )
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc1 = nn.Linear(channels[-1] * 3 * 3, 128)  # 28 -> 14 -> 7 -> 3 after three 2x pools (floor)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for conv in self.convs:
            x = F.relu(F.max_pool2d(conv(x), 2))
        x = self.drop(torch.flatten(x, 1))
        return self.fc2(F.relu(self.fc1(x)))


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of a net's logits on each image and on its left-right mirror
    (Fashion-MNIST's classes are mirror-symmetric). Part of the logged model, so that serving gets it too."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.net(x) + self.net(x.flip(-1))) / 2


MODELS = {"model1": Model1, "model2": Model2, "model3": Model3}


def build(name: str, dropout: float, width: float = 1.0) -> nn.Module:
    if name == "model3":
        return Model3(dropout=dropout, width=width)
    return MODELS[name](dropout=dropout)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
