"""A small VGG-style CNN for 8x8 digits that trains with BatchNorm, with a per-channel affine, or with nothing.

The same network, switched by one argument, is what the demo, the CLI example and the accuracy benchmark
compare: ``norm="batchnorm"`` is the usual baseline; ``norm="affine"`` keeps what BatchNorm's affine part
leaves once its statistics are gone (:class:`lightning_msr.nn.affine.ChannelAffine`, a learnable per-channel
scale and bias: the pairing used in the Mean Shift Rejection paper, and exactly what
``MeanShiftRejection(batchnorm="replace")`` puts in place of each BatchNorm); ``norm="none"`` is a plain
conv net with conv biases. Mean Shift Rejection itself is never part of the model: it is added to the
Trainer as a callback.

Example::

    >>> import torch
    >>> from examples.digits.model import SmallCNN
    >>> model = SmallCNN(norm="affine", width=8)
    >>> model(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    0
"""

from __future__ import annotations

from torch import Tensor, nn

from examples.classifier import SCHEDULES, ImageClassifier, Schedule
from examples.norms import NORMS, Norm, fold_norms_, make_norm

__all__ = ["NORMS", "SCHEDULES", "SmallCNN"]



class SmallCNN(ImageClassifier):
    """Four 3x3 conv layers (``width``, ``width``, pool, ``2*width``, ``2*width``), global average pool, linear head.

    Trained with SGD (momentum, optional Nesterov, weight decay) and a per-step learning-rate schedule; logs
    ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc`` (torchmetrics).
    Every hyper-parameter is a plain typed argument, so ``LightningCLI`` exposes them as ``--model.*`` flags.

    Args:
        norm: what follows each conv: ``"batchnorm"``, ``"affine"`` (per-channel scale and bias, no
            statistics), ``"agc"`` (Deep Control's automatic gain control) or ``"none"`` (the convs get
            biases instead). Checkpoints record the layers the network has when saved (see
            :func:`examples.norms.record_norm`), so a model whose BatchNorm a callback replaced reloads as such.
        width: channels of the first two convs (the last two have ``2 * width``).
        in_channels: channels of the input images.
        num_classes: number of classes.
        dropout: dropout probability before the linear head.
        lr: (peak) learning rate of SGD.
        momentum: SGD momentum.
        nesterov: use Nesterov momentum.
        weight_decay: L2 weight decay of SGD (applied to every parameter).
        schedule: ``"constant"``, ``"cosine"`` (per-step cosine decay to 0 after a linear warm-up) or
            ``"onecycle"`` (PyTorch's ``OneCycleLR``).
        warmup_fraction: fraction of the training steps used for the linear warm-up of ``"cosine"``.

    Raises:
        ValueError: for an unknown ``norm`` or ``schedule``, or a hyper-parameter out of range.

    Example::

        >>> from examples.digits.model import SmallCNN
        >>> [type(m).__name__ for m in SmallCNN(norm="batchnorm", width=4).features[:3]]
        ['Conv2d', 'BatchNorm2d', 'ReLU']
        >>> [type(m).__name__ for m in SmallCNN(norm="none", width=4).features[:3]]
        ['Conv2d', 'Identity', 'ReLU']
    """

    def __init__(
        self,
        norm: Norm = "batchnorm",
        width: int = 32,
        in_channels: int = 1,
        num_classes: int = 10,
        dropout: float = 0.0,
        lr: float = 0.05,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        schedule: Schedule = "cosine",
        warmup_fraction: float = 0.05,
    ) -> None:
        super().__init__(num_classes)
        if norm not in NORMS:
            raise ValueError(f"Expected `norm` to be one of {NORMS}, but got {norm!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected `schedule` to be one of {SCHEDULES}, but got {schedule!r}.")
        for name, value in (("width", width), ("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive integer, but got {value!r}.")
        if not lr > 0:
            raise ValueError(f"Expected `lr` to be positive, but got {lr!r}.")
        for name, value in (("dropout", dropout), ("momentum", momentum), ("warmup_fraction", warmup_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Expected `{name}` to be in [0, 1), but got {value!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"Expected `weight_decay` to be non-negative, but got {weight_decay!r}.")
        self.save_hyperparameters()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=norm == "none")
            return [conv, make_norm(norm, c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width),
            *block(width, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        fold_norms_(self.features, norm)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
