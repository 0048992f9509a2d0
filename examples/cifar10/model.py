"""torchvision's ResNet-18 adapted to 32x32 images, as a LightningModule for CIFAR-10.

The ImageNet stem (7x7 stride-2 conv and max-pool) would shrink a 32x32 image to 8x8 before the first block;
for CIFAR the usual adaptation is a 3x3 stride-1 stem conv and no max-pool. The network keeps torchvision's
BatchNorm layers by default: that is the model users already have, and it is what
``MeanShiftRejection(batchnorm="replace")`` or ``DeepControl()`` takes BatchNorm out of at fit setup.

Example::

    >>> import torch
    >>> from examples.cifar10.model import CIFARResNet
    >>> model = CIFARResNet(arch="resnet18")
    >>> model.net.conv1
    Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import Literal

import torchvision
from torch import Tensor, nn

from examples.classifier import ImageClassifier
from examples.norms import NORMS, Norm, fold_norms_, make_norm

__all__ = ["CIFARResNet", "cifar_resnet"]

Arch = Literal["resnet18", "resnet34", "resnet50"]


def cifar_resnet(arch: Arch = "resnet18", num_classes: int = 10, norm: Norm = "batchnorm") -> nn.Module:
    """A torchvision ResNet with a 3x3 stride-1 stem and no max-pool, for 32x32 inputs (no pretrained weights).

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        num_classes: outputs of the final linear layer.
        norm: ``"batchnorm"`` (torchvision's default), ``"affine"`` (per-channel scale and bias, no
            statistics), ``"agc"`` (Deep Control's automatic gain control) or ``"none"``.

    Raises:
        ValueError: for an unknown ``arch`` or ``norm``.

    Example::

        >>> from examples.cifar10.model import cifar_resnet
        >>> type(cifar_resnet(norm="affine").bn1).__name__
        'ChannelAffine'
    """
    if arch not in ("resnet18", "resnet34", "resnet50"):
        raise ValueError(f"Expected `arch` to be one of 'resnet18', 'resnet34', 'resnet50', but got {arch!r}.")
    if norm not in NORMS:
        raise ValueError(f"Expected `norm` to be one of {NORMS}, but got {norm!r}.")
    net = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, norm_layer=lambda channels: make_norm(norm, channels)
    )
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return fold_norms_(net, norm)


class CIFARResNet(ImageClassifier):
    """CIFAR-10 classifier: :func:`cifar_resnet`, cross-entropy, SGD with Nesterov momentum and a per-step schedule.

    Logs ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc`` (torchmetrics).

    Args:
        arch: torchvision ResNet variant.
        num_classes: number of classes.
        norm: normalisation layers of the network (see :func:`cifar_resnet`). Checkpoints record the layers
            the network has when saved (:func:`examples.norms.record_norm`): after
            ``MeanShiftRejection(batchnorm="replace")`` a checkpoint reloads with ``norm="fold"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay.
        label_smoothing: label smoothing of the cross-entropy.
        schedule: ``"onecycle"`` (PyTorch's ``OneCycleLR``), ``"cosine"`` (cosine decay to 0, per step)
            or ``"constant"``.

    Raises:
        ValueError: for an unknown ``arch``, ``norm`` or ``schedule``, or a non-positive ``lr``.

    Example::

        >>> from examples.cifar10.model import CIFARResNet
        >>> CIFARResNet(norm="none").hparams.lr
        0.1
    """

    def __init__(
        self,
        arch: Arch = "resnet18",
        num_classes: int = 10,
        norm: Norm = "batchnorm",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.0,
        schedule: Literal["onecycle", "cosine", "constant"] = "onecycle",
    ) -> None:
        super().__init__(num_classes)
        if schedule not in ("onecycle", "cosine", "constant"):
            raise ValueError(
                f"Expected `schedule` to be one of 'onecycle', 'cosine', 'constant', but got {schedule!r}."
            )
        if not lr > 0:
            raise ValueError(f"Expected `lr` to be positive, but got {lr!r}.")
        self.save_hyperparameters()
        self.net = cifar_resnet(arch, num_classes, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
