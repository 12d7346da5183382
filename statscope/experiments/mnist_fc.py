"""``mnist-fc``: the paper's §4.6 analysis network, a 4-layer fully-connected net on MNIST.

Four ``Linear(·, 128) → norm → ReLU`` blocks on the flattened 28×28 image, normalized with the
training set's global mean and std, then a ``Linear(128, 10)`` classifier. The paper does not say
what follows the last hidden layer; a single linear layer straight to the logits is the usual
choice and adds no norm layer the probes would record. The layers are named ``fc1..fc4``,
``norm1..norm4`` (the probed ones: the paper's "neuron i-j" is unit j of ``norm{i}``), ``relu1..4``
and ``head``. ``norm="bn"`` is torch's ``BatchNorm1d`` (twice as fast at batch size 4 as the
general layer); every other name comes from :func:`statscope.nn.make_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from statscope.experiments.base import Experiment

if TYPE_CHECKING:
    import torch

__all__ = ["MnistFC", "MNIST_FC", "norm_layer"]


def norm_layer(norm: str, channels: int, spatial_dims: int) -> "torch.nn.Module":
    """The norm layer called ``norm`` for ``channels`` channels; ``"bn"`` is torch's BatchNorm.

    Args:
        norm: a name of :data:`statscope.nn.NORM_NAMES`.
        channels: C of the ``(N, C, *S)`` input.
        spatial_dims: 0 for ``(N, C)`` inputs, 2 for images.

    Example:
        >>> [type(norm_layer(n, 128, 0)).__name__ for n in ("bn", "hn")]
        ['BatchNorm1d', 'HeteroNorm']
    """
    from torch import nn

    if norm == "bn":
        return nn.BatchNorm1d(channels) if spatial_dims == 0 else nn.BatchNorm2d(channels)
    from statscope.nn import make_norm

    return make_norm(norm, channels)


@dataclass(frozen=True)
class MnistFC(Experiment):
    """The §4.6 setup; see the module docstring.

    Attributes:
        width: neurons per hidden layer.
        depth: hidden layers.
    """

    width: int = 128
    depth: int = 4

    def build_model(self, norm: str, num_classes: int) -> "torch.nn.Module":
        from collections import OrderedDict

        from torch import nn

        layers: list[tuple[str, nn.Module]] = []
        features = 28 * 28
        for i in range(1, self.depth + 1):
            layers += [(f"fc{i}", nn.Linear(features, self.width)),
                       (f"norm{i}", norm_layer(norm, self.width, 0)), (f"relu{i}", nn.ReLU())]
            features = self.width
        layers.append(("head", nn.Linear(features, num_classes)))
        return nn.Sequential(OrderedDict(layers))

    def prepare(self, x, normalize, train):
        return normalize(x).reshape(len(x), -1)


MNIST_FC = MnistFC(
    name="mnist-fc",
    summary="§4.6: 4 FC layers of 128 + norm + ReLU on MNIST, SGD, 20 epochs",
    datasets=("mnist", "fashion-mnist", "mnist-5k-subset"),
    epochs=20,
)
