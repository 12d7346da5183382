"""``cifar-resnet18``: the paper's §4.1 CIFAR-10 setup, ResNet-18 with a chosen norm.

The CIFAR variant of ResNet-18 (He et al., 2016) the paper's numbers come from: a 3×3 stem
without max-pooling, four stages of two basic blocks (64, 128, 256, 512 channels, stride 2 from
the second), global average pooling and a linear classifier; every BatchNorm is the chosen norm.
Training images are padded with 4 zero pixels, randomly cropped back to 32×32 and flipped
horizontally with probability 1/2 — batched on tensors, drawn from the run's generator — and
then normalized per channel with the training set's mean and std. The learning rate is divided by
10 at half and three quarters of the epochs (100 and 150 of the default 200).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from statscope.experiments.base import Experiment
from statscope.experiments.mnist_fc import norm_layer

if TYPE_CHECKING:
    import torch

__all__ = ["CifarResNet", "CIFAR_RESNET18", "resnet18", "random_crop_flip"]


def resnet18(norm: str = "bn", num_classes: int = 10) -> "torch.nn.Module":
    """The CIFAR ResNet-18 (11.2 M parameters) with ``norm`` in place of every BatchNorm.

    Args:
        norm: a name of :data:`statscope.nn.NORM_NAMES`.
        num_classes: outputs of the classifier.

    Returns:
        nn.Module mapping (N, 3, 32, 32) float32 to (N, num_classes) logits.

    Example:
        >>> import torch
        >>> resnet18("hn")(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = norm_layer(norm, cout, 2)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = norm_layer(norm, cout, 2)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              norm_layer(norm, cout, 2))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), norm_layer(norm, 64, 2),
                               nn.ReLU(inplace=True)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def random_crop_flip(x: "torch.Tensor", generator: "torch.Generator", padding: int = 4
                     ) -> "torch.Tensor":
    """Zero-pad by ``padding``, crop back to the input size at a random offset, flip half.

    One gather for the whole batch; offsets and flips come from ``generator`` (on ``x``'s device).

    Args:
        x: (B, C, H, W) images of any dtype.
        generator: the source of the offsets (B, 2) and flips (B,).
        padding: pixels of zeros on each side.

    Returns:
        (B, C, H, W), same dtype and device.

    Example:
        >>> import torch
        >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
        >>> y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
        >>> bool(torch.equal(y, x) or torch.equal(y, x.flip(-1)))
        True
    """
    import torch

    b, c, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator, device=dev)
    flip = torch.rand(b, 1, generator=generator, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy + ar_h
    cols = ox + torch.where(flip, w - 1 - ar_w, ar_w)
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass(frozen=True)
class CifarResNet(Experiment):
    """The §4.1 setup; see the module docstring.

    Attributes:
        padding: zero pixels added on each side before the random crop.
    """

    padding: int = 4

    def build_model(self, norm: str, num_classes: int) -> "torch.nn.Module":
        return resnet18(norm, num_classes)

    def prepare(self, x, normalize, train):
        return x if train else normalize(x)  # training images stay uint8 until augmented

    def batch(self, x, normalize, generator):
        return normalize(random_crop_flip(x, generator, self.padding))


CIFAR_RESNET18 = CifarResNet(
    name="cifar-resnet18",
    summary="§4.1: ResNet-18 on CIFAR-10, crop+flip, SGD, 200 epochs, lr ÷10 at 100 and 150",
    datasets=("cifar10",),
    epochs=200,
    milestones=(0.5, 0.75),
)
