"""Data sets, the network family and the method registry of ``benchmarks/accuracy.py``.

scikit-learn's digits are embedded in its package and the ``shapes`` (2-D) and ``waves`` (1-D) tasks are generated
procedurally from a seed; Fashion-MNIST is read by torchvision's loader from the four idx files (Debian's
``dataset-fashion-mnist`` package, a folder given with ``--data-dir``, or torchvision's download), see
:func:`fashion_mnist_root`.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------- data


@dataclass
class Task:
    """A classification task held in memory."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    widths: tuple[int, ...] = (16, 32, 64)
    augment: int = 0  # > 0: random crop with this zero padding + horizontal flip of every training batch

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def load_digits_task(max_train: Optional[int] = None) -> Task:
    """scikit-learn's 8x8 digits (1797 images), stratified 80/20 split with a fixed seed, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.images.astype("float32") / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=0.2, random_state=0, stratify=data.target)
    task = Task(
        "digits",
        torch.from_numpy(x_tr).unsqueeze(1),
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te).unsqueeze(1),
        torch.from_numpy(y_te).long(),
        10,
    )
    return _subsample(task, max_train)


SHAPE_CLASSES = (
    "disk",
    "ring",
    "square",
    "square_outline",
    "triangle",
    "plus",
    "cross",
    "h_stripes",
    "v_stripes",
    "checker",
)


def _shape_masks(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Soft (anti-aliased) masks in [0, 1] of one random shape per label, random position, size and angle."""
    n = labels.numel()
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, generator=gen)  # noqa: E731
    radius = u(size * 0.2, size * 0.36)
    cx = size / 2 + u(-size * 0.15, size * 0.15)
    cy = size / 2 + u(-size * 0.15, size * 0.15)
    angle = u(-math.pi / 8, math.pi / 8)
    dx, dy = xx - cx, yy - cy
    rx = dx * torch.cos(angle) + dy * torch.sin(angle)  # rotated frame
    ry = -dx * torch.sin(angle) + dy * torch.cos(angle)
    dist = torch.sqrt(dx**2 + dy**2)
    cheb = torch.maximum(rx.abs(), ry.abs())
    soft = lambda d: torch.clamp(0.5 - d, 0.0, 1.0)  # noqa: E731  (signed distance -> coverage)
    width = 0.16 * radius * 2
    period = u(3.0, 5.0)
    phase = u(0.0, 2 * math.pi)
    inside = soft(cheb - radius)  # a square window that bounds the textures
    masks = {
        "disk": soft(dist - radius),
        "ring": soft((dist - radius * 0.75).abs() - width / 2),
        "square": soft(cheb - radius * 0.85),
        "square_outline": soft((cheb - radius * 0.75).abs() - width / 2),
        "triangle": soft(torch.maximum(ry - radius * 0.6, (rx.abs() * 1.7 - (radius * 0.9 - ry)) / 2.0)),
        "plus": soft(
            torch.minimum(
                torch.maximum(rx.abs() - width / 2, ry.abs() - radius),
                torch.maximum(ry.abs() - width / 2, rx.abs() - radius),
            )
        ),
        "cross": soft(
            torch.minimum(
                torch.maximum((rx - ry).abs() / 1.414 - width / 2, cheb - radius * 0.8),
                torch.maximum((rx + ry).abs() / 1.414 - width / 2, cheb - radius * 0.8),
            )
        ),
        "h_stripes": inside * (torch.sin(2 * math.pi * ry / period + phase) > 0).float(),
        "v_stripes": inside * (torch.sin(2 * math.pi * rx / period + phase) > 0).float(),
        "checker": inside
        * ((torch.sin(2 * math.pi * rx / period + phase) * torch.sin(2 * math.pi * ry / period + phase)) > 0).float(),
    }
    out = torch.empty(n, size, size)
    for k, name in enumerate(SHAPE_CLASSES):
        sel = labels == k
        out[sel] = masks[name][sel]
    return out


def make_shapes(n: int, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images of the ``shapes`` task: 10 shape/texture classes under strong per-image nuisances.

    Each image is ``offset + ramp + gain * mask + noise`` with a per-image brightness ``offset ~ U(-2, 2)``
    (ten times the weakest contrast), a random linear illumination ramp, a contrast ``gain ~ U(0.25, 1)``
    and white noise of standard deviation 0.25 -- i.e. a large spatial *common-mode* per image, which is what
    MSR's zero-mean kernels claim to reject, together with noise and clutter that keep the task from saturating.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=gen)
    masks = _shape_masks(labels, size, gen)
    coords = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    offset = torch.rand(n, 1, 1, generator=gen) * 4 - 2
    slope = (torch.rand(n, 2, generator=gen) * 2 - 1) * 1.0
    ramp = slope[:, 0, None, None] * xx + slope[:, 1, None, None] * yy
    gain = 0.25 + 0.75 * torch.rand(n, 1, 1, generator=gen)
    noise = 0.25 * torch.randn(n, size, size, generator=gen)
    images = offset + ramp + gain * masks + noise
    return images.unsqueeze(1), labels


def load_shapes_task(n_train: int = 1000, n_test: int = 1000, max_train: Optional[int] = None) -> Task:
    """The generated ``shapes`` task (12x12, 10 classes): train and test drawn from disjoint seeds.

    The network for it is narrower (8-16-32 channels) than for digits (16-32-64) to keep the CPU sweep affordable.
    """
    x_tr, y_tr = make_shapes(n_train, size=12, seed=1)
    x_te, y_te = make_shapes(n_test, size=12, seed=2)
    return _subsample(Task("shapes", x_tr, y_tr, x_te, y_te, len(SHAPE_CLASSES), (8, 16, 32)), max_train)


WAVE_LENGTH = 128
WAVE_CLASSES = 12  # 6 frequency bands x 2 wave shapes (sine, square)


def make_waves(n: int, seed: int, length: int = WAVE_LENGTH) -> tuple[Tensor, Tensor]:
    """``n`` noisy 1-D waves of ``length`` samples, shape ``(n, 1, length)``, and their labels in ``[0, 12)``.

    Label ``y`` sets the wave's shape (``y // 6``: sine or square) and its frequency band (``y % 6``: 3 + 0.7 band
    cycles over the window, jittered by up to 0.3 cycles). Every sample has its own random phase, an amplitude
    U(0.5, 1.5), a DC offset N(0, 0.5) (a per-sample common mode, as the ``shapes`` task's brightness offset) and
    white noise of unit std, so a classifier has to integrate over the whole window.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, length)
    y = torch.randint(0, WAVE_CLASSES, (n,), generator=g)
    freq = 3 + 0.7 * (y % 6).float() + 0.3 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    wave = torch.sin(2 * math.pi * freq[:, None] * t[None] + phase)
    wave = torch.where((y // 6)[:, None] == 1, torch.sign(wave), wave)
    amplitude = 0.5 + torch.rand(n, 1, generator=g)
    offset = 0.5 * torch.randn(n, 1, generator=g)
    x = amplitude * wave + offset + torch.randn(n, length, generator=g)
    return x[:, None], y


def load_waves_task(n_train: int = 3000, n_test: int = 2000, max_train: Optional[int] = None) -> Task:
    """The generated 1-D ``waves`` task (:func:`make_waves`): a sequence task for the 1-D conv net ``cnn1d``.

    Train and test are drawn from disjoint seeds. It is the benchmark's only 1-D task: the networks for it are
    ``Conv1d`` + ``BatchNorm1d`` nets, which MSR adopts as it does the 2-D ones.
    """
    x_tr, y_tr = make_waves(n_train, seed=0)
    x_te, y_te = make_waves(n_test, seed=1)
    return _subsample(Task("waves", x_tr, y_tr, x_te, y_te, WAVE_CLASSES, (16, 32, 64, 64)), max_train)


def _subsample(task: Task, max_train: Optional[int]) -> Task:
    if max_train is None:
        return task
    n_test = max(max_train // 2, 10)
    return Task(
        task.name,
        task.x_train[:max_train],
        task.y_train[:max_train],
        task.x_test[:n_test],
        task.y_test[:n_test],
        task.num_classes,
        task.widths,
        task.augment,
    )


# Debian's dataset-fashion-mnist package installs the four idx files here
FASHION_MNIST_PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lightning_msr" / "datasets"
# per-pixel statistics of the Fashion-MNIST training set, to standardise the inputs
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _has_idx_files(folder: Path) -> bool:
    return all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in FASHION_MNIST_FILES)


def prepare_fashion_mnist_root(source: Path, cache_dir: Path) -> Path:
    """Lay out the idx files of ``source`` (plain or ``.gz``) as torchvision expects: ``<root>/FashionMNIST/raw/``.

    ``source`` is a folder holding the four files, e.g. Debian's ``/usr/share/datasets/fashion-mnist``; they are
    unpacked (or copied) once into ``cache_dir/FashionMNIST/raw/`` and ``cache_dir`` is returned as the root.
    """
    raw = cache_dir / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        target = raw / name
        if target.exists():
            continue
        # a file of its own: two sweeps started together unpack side by side, and the last rename wins
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=raw)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dst:
                if (source / name).exists():
                    with (source / name).open("rb") as src:
                        shutil.copyfileobj(src, dst)
                else:
                    with gzip.open(source / f"{name}.gz", "rb") as src:
                        shutil.copyfileobj(src, dst)
            tmp.replace(target)  # never leave a half-written file where torchvision looks
        finally:
            tmp.unlink(missing_ok=True)
    return cache_dir


def fashion_mnist_root(
    data_dir: Optional[Path] = None, cache_dir: Path = DEFAULT_CACHE_DIR, download: bool = False
) -> Path:
    """The root to pass to ``torchvision.datasets.FashionMNIST``, found in this order:

    1. ``data_dir`` if given: either a torchvision root (holding ``FashionMNIST/raw/``) or a folder with the four
       idx files (plain or ``.gz``), which are unpacked into ``cache_dir``;
    2. the Debian package's folder (``apt-get install dataset-fashion-mnist``), unpacked into ``cache_dir``;
    3. ``cache_dir`` itself if it already holds the files (an earlier run);
    4. with ``download=True``, ``cache_dir`` (torchvision downloads the files there).

    Otherwise a ``FileNotFoundError`` says both ways to get the data.
    """
    if data_dir is not None:
        data_dir = Path(data_dir)
        if _has_idx_files(data_dir / "FashionMNIST" / "raw"):
            return data_dir
        if _has_idx_files(data_dir):
            return prepare_fashion_mnist_root(data_dir, cache_dir)
        raise FileNotFoundError(
            f"Expected `--data-dir` to hold the four Fashion-MNIST idx files {list(FASHION_MNIST_FILES)} (plain or "
            f".gz) or a torchvision root with them in FashionMNIST/raw/, but {str(data_dir)!r} has neither."
        )
    if _has_idx_files(FASHION_MNIST_PACKAGE_DIR):
        return prepare_fashion_mnist_root(FASHION_MNIST_PACKAGE_DIR, cache_dir)
    if _has_idx_files(cache_dir / "FashionMNIST" / "raw") or download:
        return cache_dir
    raise FileNotFoundError(
        "Fashion-MNIST is not installed. Either install Debian's package (`apt-get install -y "
        f"dataset-fashion-mnist`, which puts the idx files in {FASHION_MNIST_PACKAGE_DIR}), or pass `--download` "
        f"to let torchvision download them into {cache_dir} (`--cache-dir`); `--data-dir DIR` reads them from DIR."
    )


def load_fashion_mnist_task(
    max_train: Optional[int] = None,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    data_dir: Optional[Path] = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    download: bool = False,
) -> Task:
    """Fashion-MNIST (28x28 grey, 10 classes) through ``torchvision.datasets.FashionMNIST``, standardised.

    ``train_size`` / ``test_size`` take a fixed random subset (seed 0, the same for every method and run) of the
    60k training and 10k test images. Training batches get the usual light augmentation (random crop with
    padding 2, horizontal flip).
    """
    from torchvision.datasets import FashionMNIST

    root = fashion_mnist_root(data_dir, cache_dir, download)
    parts = []
    for train, size in ((True, train_size), (False, test_size)):
        ds = FashionMNIST(str(root), train=train, download=download)
        x = (ds.data.float().div(255.0).unsqueeze(1) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        y = ds.targets.long()
        if size is not None and size < len(y):
            keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:size]
            x, y = x[keep], y[keep]
        parts += [x, y]
    return _subsample(Task("fashion_mnist", *parts, num_classes=10, augment=2), max_train)


TASKS: dict[str, Callable[..., Task]] = {
    "digits": load_digits_task,
    "shapes": load_shapes_task,
    "fashion_mnist": load_fashion_mnist_task,
    "waves": load_waves_task,
}


def augment_batch(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of every image after zero padding by ``padding`` pixels, and a horizontal flip of half of them."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    rows = (torch.arange(h).view(1, h, 1) + dy).expand(n, h, w)
    cols = torch.arange(w).view(1, 1, w) + dx
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(-1), cols).expand(n, h, w)
    batch = torch.arange(n).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- network


class ChannelAffine(nn.Module):
    """A learnable per-channel scale and bias (what BatchNorm's affine part leaves without its statistics).

    ``log_scale=True`` parametrises the scale as ``exp(s)`` as in the authors' code.
    """

    def __init__(self, channels: int, log_scale: bool = False) -> None:
        super().__init__()
        self.log_scale = log_scale
        self.scale = nn.Parameter(torch.zeros(channels) if log_scale else torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale.exp() if self.log_scale else self.scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + self.bias.view(shape)


class FilterResponseNorm2d(nn.Module):
    """Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

    Per sample and channel, ``nu2 = mean over H, W of x^2``; ``y = gamma * x / sqrt(nu2 + eps) + beta`` and, with
    ``tlu=True``, ``max(y, tau)``. No batch statistics, so it behaves the same at every batch size; it replaces
    both a BatchNorm and the ReLU after it. ``eps`` is a constant here (the paper also allows a learned one).
    """

    def __init__(self, channels: int, eps: float = 1e-6, tlu: bool = True) -> None:
        super().__init__()
        self.eps, self.tlu = eps, tlu
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.tau = nn.Parameter(torch.zeros(channels)) if tlu else None

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True)
        y = self.gamma.view(shape) * x * torch.rsqrt(nu2 + self.eps) + self.beta.view(shape)
        return torch.maximum(y, self.tau.view(shape)) if self.tau is not None else y


NORM_KINDS = ("bn", "gn", "gnws", "frn", "affine", "exp_affine", "agc", "none")


def swap_batchnorm(model: nn.Module, kind: str) -> int:
    """Replace every BatchNorm2d of a model built with BatchNorm (a torchvision one) by a peer, in place: ``"gn"``
    (GroupNorm of up to 32 groups that divide the channels) or ``"frn"`` (FRN + TLU; the ReLU after it stays).
    Returns how many were replaced. For the speed benchmarks, where the peer must sit where BatchNorm was."""
    swapped = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name, bn in swapped:
        channels = bn.num_features
        new = nn.GroupNorm(math.gcd(32, channels), channels) if kind == "gn" else FilterResponseNorm2d(channels)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, new.to(bn.weight.device))
    return len(swapped)


def _norm(kind: str, channels: int, act: bool = False, dims: int = 2) -> nn.Module:
    """The layer after a conv, with the activation that follows it when ``act`` (``frn``: the TLU is the activation).

    ``dims`` is the conv's number of spatial dimensions: BatchNorm is ``BatchNorm1d`` after a ``Conv1d``; the other
    kinds work on any ``(N, C, *spatial)`` input."""
    if kind == "frn":
        return FilterResponseNorm2d(channels, tlu=act)
    layer = _norm_only(kind, channels, dims)
    return nn.Sequential(layer, nn.ReLU()) if act else layer


def _norm_only(kind: str, channels: int, dims: int = 2) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if kind == "gn":  # groups of 4 channels, at most 32 groups (Wu & He's default)
        return nn.GroupNorm(min(32, max(1, channels // 4)), channels)
    if kind == "affine":
        return ChannelAffine(channels)
    if kind == "exp_affine":
        return ChannelAffine(channels, log_scale=True)
    if kind == "agc":
        from lightning_msr.nn import AutomaticGainControl

        return AutomaticGainControl(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"Expected a norm kind in {NORM_KINDS}, but got {kind!r}.")


def vgg_small(
    image_size: int, num_classes: int, norm: str = "bn", widths: tuple[int, ...] = (16, 32, 64)
) -> nn.Sequential:
    """A small VGG-style CNN: ``log2(image_size) - 1`` stages of two 3x3 convs + max-pool, then GAP and a linear head.

    ``norm`` is the layer after every conv: ``"bn"`` (BatchNorm2d), ``"gn"`` (GroupNorm), ``"frn"`` (Filter
    Response Normalization, whose TLU then replaces the ReLU), ``"affine"``/``"exp_affine"`` (a learnable
    per-channel scale and bias, no statistics) or ``"none"``. Convs carry a bias only when ``norm="none"``.
    """
    stages = max(1, round(math.log2(image_size)) - 1)
    layers: list[nn.Module] = []
    cin = 1
    for s in range(stages):
        cout = widths[min(s, len(widths) - 1)]
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), *_flat(_norm(norm, cout, act=True))]
            cin = cout
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def cnn1d(num_classes: int, norm: str = "bn", widths: tuple[int, ...] = (16, 32, 64, 64)) -> nn.Sequential:
    """A 1-D conv net for sequences ``(N, 1, L)``: per width a ``Conv1d`` (kernel 5) + norm + ReLU, max-pool by 2
    between them, then global average pooling and a linear head. ``norm`` as in :func:`vgg_small`."""
    layers: list[nn.Module] = []
    cin = 1
    for i, cout in enumerate(widths):
        layers += [nn.Conv1d(cin, cout, 5, padding=2, bias=norm == "none"), *_flat(_norm(norm, cout, True, dims=1))]
        if i < len(widths) - 1:
            layers.append(nn.MaxPool1d(2))
        cin = cout
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _flat(module: nn.Module) -> list[nn.Module]:
    """A norm + ReLU pair as two layers of the flat VGG ``Sequential`` (so the layer names stay ``model.<i>``)."""
    return list(module) if isinstance(module, nn.Sequential) else [module]


class BasicBlock(nn.Module):
    """The ResNet basic block as users write it: two 3x3 conv + BatchNorm, ReLU, identity or 1x1-conv+BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str = "bn") -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(norm, cout, act=True)  # BatchNorm + ReLU (FRN: FRN + TLU)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.bn2 = _norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), _norm(norm, cout))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): a 3x3 stem, 3 stages of 3 basic blocks (16/32/64 channels, stride 2
    at the start of stages 2 and 3), 1x1 projection shortcuts, global average pool and a linear head.

    ``norm`` as in :func:`vgg_small`; with ``"frn"`` the FRN+TLU replaces the BatchNorm and ReLU inside each
    block and the stem, the BatchNorms before the residual sum become FRN without TLU, and the ReLU after the
    sum stays.
    """

    def __init__(
        self, num_classes: int = 10, norm: str = "bn", widths: tuple[int, ...] = (16, 32, 64), blocks: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1, bias=norm == "none")
        self.bn1 = _norm(norm, widths[0], act=True)
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    *(BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1, norm) for b in range(blocks))
                )
            )
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


ARCHS = ("vgg", "resnet20", "resnet8", "cnn1d")
ARCHS_1D = ("cnn1d",)  # the archs for 1-D tasks (inputs ``(N, 1, L)``); the others are for images


class _Standardize(nn.Module):
    """Weight Standardization (Qiao et al. 2019) as a parametrization: each filter to zero mean, unit variance."""

    def forward(self, weight: Tensor) -> Tensor:
        flat = weight.flatten(1)
        mean = flat.mean(1, keepdim=True)
        std = flat.std(1, keepdim=True, unbiased=False)
        return ((flat - mean) / (std + 1e-5)).view_as(weight)


def _standardize_convs(model: nn.Module) -> nn.Module:
    from torch.nn.utils import parametrize

    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            parametrize.register_parametrization(module, "weight", _Standardize())
    return model


def make_model(arch: str, task: Task, norm: str) -> nn.Module:
    """The network of ``arch`` (``"vgg"``: :func:`vgg_small`, ``"resnet20"``: :class:`ResNet20`, ``"resnet8"``: the
    same with one block per stage, ``"cnn1d"``: :func:`cnn1d`, for 1-D tasks only) for ``task``. ``norm="gnws"`` is
    GroupNorm after Weight-Standardized convs."""
    sequence = task.x_train.dim() == 3
    if arch in ARCHS and sequence != (arch in ARCHS_1D):
        allowed = ARCHS_1D if sequence else tuple(a for a in ARCHS if a not in ARCHS_1D)
        raise ValueError(
            f"Expected an architecture in {allowed} for the {'1-D' if sequence else '2-D'} task {task.name!r}, "
            f"but got {arch!r}."
        )
    if norm == "gnws":
        return _standardize_convs(make_model(arch, task, "gn"))
    if arch == "cnn1d":
        return cnn1d(task.num_classes, norm=norm, widths=task.widths)
    if arch == "vgg":
        return vgg_small(task.image_size, task.num_classes, norm=norm, widths=task.widths)
    if arch == "resnet20":
        return ResNet20(task.num_classes, norm=norm, widths=task.widths)
    if arch == "resnet8":
        return ResNet20(task.num_classes, norm=norm, widths=task.widths, blocks=1)
    raise ValueError(f"Expected an architecture in {ARCHS}, but got {arch!r}.")


def choose_lr(sweep: dict[float, dict[int, float]]) -> float:
    """The best learning rate of a sweep ``{lr: {seed: accuracy}}``, chosen on the sweep's seed alone.

    The sweep's seed is the lowest one, run at every LR; later seeds run at the chosen LR only. Choosing by the mean
    over the seeds run so far would favour an LR with one lucky seed over the one whose second seed came out lower.
    """
    chooser = min(min(by_seed) for by_seed in sweep.values())
    return max((lr for lr in sweep if chooser in sweep[lr]), key=lambda lr: sweep[lr][chooser])


# ----------------------------------------------------------------------------------------------- methods


@dataclass
class MethodSpec:
    """A parsed ``--methods`` entry such as ``msr_affine_noise[init_magnitude=2,noise_scale=0.1]``."""

    text: str
    base: str
    options: dict[str, Any] = field(default_factory=dict)


BASE_METHODS = {
    # name: (layer after every conv, MeanShiftRejection?, NoiseInjection?)
    "batchnorm": ("bn", False, False),
    "groupnorm": ("gn", False, False),
    "gn_ws": ("gnws", False, False),
    "frn": ("frn", False, False),
    # the network is built with BatchNorm and adopted by the callbacks only: MeanShiftRejection(batchnorm="replace")
    "msr_replace": ("bn", True, False),
    "msr_replace_noise": ("bn", True, True),
    "none": ("none", False, False),
    "msr": ("none", True, False),
    "msr_noise": ("none", True, True),
    "msr_affine": ("affine", True, False),
    "msr_affine_noise": ("affine", True, True),
    "affine": ("affine", False, False),
    # Deep Control: AutomaticGainControl (default arguments, as DeepControl() inserts it in place of BatchNorm)
    # after every conv, built directly so that the rows do not depend on the callback's surgery
    "agc": ("agc", False, False),
    "msr_agc": ("agc", True, False),
    "msr_agc_noise": ("agc", True, True),
}


def _flag(name: str, value: str) -> bool:
    flags = {"1": True, "true": True, "0": False, "false": False}
    if value.lower() not in flags:
        raise ValueError(f"Expected `{name}` to be one of {sorted(flags)}, but got {value!r}.")
    return flags[value.lower()]


# option -> how its value is parsed
OPTIONS: dict[str, Callable[[str], Any]] = {
    "init_magnitude": float,
    "alpha": float,
    "mode": str,
    "msr_exclude": str,
    "noise_scale": float,
    "noise_shift": float,
    "noise_position": str,
    "noise_schedule": str,
    "warmup": float,
    "norm": str,
    "wd": float,
    "momentum": float,
    "nesterov": lambda v: _flag("nesterov", v),
    "keep_magnitude": lambda v: _flag("keep_magnitude", v),
    "lsuv": float,
    "conv_lr": float,
    "clip": float,
    "unit_clip": float,
    "filter_clip": float,
    "calibrate": lambda v: _flag("calibrate", v),
    "residual_scale": float,
    "include_stem": lambda v: _flag("include_stem", v),
    "adaptive_clip": lambda v: None if v.lower() == "none" else float(v),
    "spherical": lambda v: _flag("spherical", v),
    "scale_invariant": lambda v: _flag("scale_invariant", v),
    "deep_control": lambda v: _flag("deep_control", v),
    "gain_reparam": lambda v: _flag("gain_reparam", v),
    "keep_bn": lambda v: _flag("keep_bn", v),
}


# where the noise goes: at the conv outputs (the paper), after the per-channel affine, or after the ReLU
NOISE_POSITIONS = {"conv": ["Conv1d", "Conv2d"], "affine": ["_accuracy_models.ChannelAffine"], "relu": ["ReLU"]}


def parse_method(text: str) -> MethodSpec:
    """Parse ``name[key=value,...]`` into a :class:`MethodSpec` (raises ``ValueError`` for unknown names)."""
    text = text.strip()
    base, _, rest = text.partition("[")
    if base not in BASE_METHODS:
        raise ValueError(f"Expected a method in {sorted(BASE_METHODS)}, but got {base!r}.")
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"Expected `name[key=value,...]`, but got {text!r}.")
        for item in filter(None, rest[:-1].split(";" if ";" in rest else ",")):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in OPTIONS:
                raise ValueError(f"Expected an option in {sorted(OPTIONS)}, but got {key!r} in {text!r}.")
            options[key] = OPTIONS[key](value.strip())
    return MethodSpec(text, base, options)


def build(spec: MethodSpec, task: Task, seed: int, arch: str = "vgg") -> tuple[nn.Module, list, dict[str, Any]]:
    """The network, the callbacks and the training overrides (``warmup``, ``wd``, ``momentum``) of a method.

    A method with MeanShiftRejection on a network that has BatchNorm (``msr_replace*``, or ``norm=bn``) leaves
    the BatchNorm to the callback, ``MeanShiftRejection(batchnorm="replace")``, as a user's model would be adopted.
    """
    import lightning_msr

    norm, msr, noise = BASE_METHODS[spec.base]
    norm = spec.options.get("norm", norm)
    torch.manual_seed(seed)
    model = make_model(arch, task, norm)
    callbacks: list = []
    if spec.options.get("deep_control"):  # the user's path: DeepControl() first, on the BatchNorm network
        if norm != "bn":
            raise ValueError(f"Expected `deep_control=1` on a BatchNorm network (norm=bn), but got {spec.text!r}.")
        callbacks.append(lightning_msr.DeepControl())
    if msr:
        names = (
            "init_magnitude",
            "alpha",
            "mode",
            "keep_magnitude",
            "scale_invariant",
            "calibrate",
            "residual_scale",
            "adaptive_clip",
            "include_stem",
        )
        kwargs = {k: spec.options[k] for k in names if k in spec.options}
        if "msr_exclude" in spec.options:  # e.g. "model.0" keeps the first conv free to see the input's mean
            kwargs["exclude"] = spec.options["msr_exclude"].split("|")
        batchnorm = "replace" if norm == "bn" else "error"
        if spec.options.get("keep_bn"):  # BatchNorm kept, its convs' kernels held zero-mean: the constraint alone
            batchnorm = "warn"
            kwargs.setdefault("calibrate", False)
            kwargs.setdefault("adaptive_clip", None)
        callbacks.append(lightning_msr.MeanShiftRejection(seed=seed, batchnorm=batchnorm, **kwargs))
    if noise:
        kwargs: dict[str, Any] = {}
        for opt, arg in (("noise_scale", "scale"), ("noise_shift", "shift"), ("noise_schedule", "schedule")):
            if opt in spec.options:
                kwargs[arg] = spec.options[opt]
        if kwargs.get("schedule", "constant") != "constant":  # decay to zero by the end of training
            kwargs["final_scale"], kwargs["final_shift"] = 0.0, 0.0
        if "noise_position" in spec.options:
            kwargs["module_types"] = NOISE_POSITIONS[spec.options["noise_position"]]
        kwargs["seed"] = seed
        callbacks.append(lightning_msr.NoiseInjection(**kwargs))
    if spec.options.get("spherical"):
        callbacks.append(SphericalFilters())
    if spec.options.get("gain_reparam"):
        callbacks.append(CalibratedGains())
    if spec.options.get("lsuv"):
        _lsuv(model, task, seed, spec.options.get("init_magnitude", 1.0), int(spec.options["lsuv"]))
    overrides = {
        k: spec.options[k]
        for k in ("warmup", "wd", "momentum", "nesterov", "conv_lr", "clip", "unit_clip")
        if k in spec.options
    }
    return model, callbacks, overrides


@torch.no_grad()
def _lsuv(model: nn.Module, task: Task, seed: int, magnitude: float, mode: int) -> None:
    """Data-dependent scaling after ZMI (LSUV-like): scale each conv -- ``mode`` 1: as a whole, 2: per filter -- so
    that its output has unit RMS on 256 training images. The kernels stay zero-mean, so the callback keeps them."""
    import lightning_msr.functional as F

    gen = torch.Generator().manual_seed(seed)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    for c in convs:
        F.zero_mean_init_(c.weight, magnitude=magnitude, generator=gen)
    x = task.x_train[torch.randperm(len(task.x_train), generator=gen)[:256]]
    out: dict[str, Tensor] = {}
    for c in convs:
        handle = c.register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
        model(x)
        handle.remove()
        y = out["y"]
        rms = y.pow(2).mean() if mode == 1 else y.pow(2).mean(dim=(0, *range(2, y.dim())))
        scale = rms.sqrt().clamp_min(1e-8).reciprocal()
        c.weight.mul_(scale.view(-1, *(1,) * (c.weight.dim() - 1)) if mode == 2 else scale)
        if c.bias is not None:
            c.bias.mul_(scale)


def has_norm_layer(model: nn.Module) -> bool:
    """Whether any normalisation layer (with batch or sample statistics) is left in ``model``."""
    kinds = (
        nn.modules.batchnorm._BatchNorm,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.modules.instancenorm._InstanceNorm,
        FilterResponseNorm2d,
    )
    return any(isinstance(m, kinds) for m in model.modules())


class SphericalFilters(L.Callback):
    """The ``spherical=1`` option: every folded-scale conv filter trained as if it were weight-normalised.

    The test of issue 26's leading hypothesis, that BatchNorm's edge is the spherical motion of its scale-invariant
    filters (Wan et al. 2021): with weight decay, a scale-invariant filter's angular step settles at
    ``sqrt(2 * lr * wd / (1 + momentum))`` whatever the gradient's size. Here the forward pass sees each
    :class:`~lightning_msr.nn.ScaledConv2d` filter at its norm ``r`` at the first step, while the optimizer steps a
    virtual weight ``v = (rho / r) * w`` with the gradient a scale-invariant filter would get, ``(r / rho) *
    P_perp(g)``: weight decay shrinks ``rho`` and the gradient grows it, as for a filter BatchNorm normalises, and no
    minibatch statistic is used. Runs after :class:`~lightning_msr.MeanShiftRejection`'s projection and clipping
    (list it after that callback), on any optimizer.
    """

    def __init__(self) -> None:
        self.state: dict[int, tuple[Tensor, Tensor]] = {}  # per weight: (r, rho), one value per output filter
        self.params: list[nn.Parameter] = []
        self.hooked = False

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        from lightning_msr.nn.scaled_conv import is_scaled_conv

        if not self.hooked:
            self.params = [m.weight for m in pl_module.modules() if is_scaled_conv(m)]
            for p in self.params:
                r = p.detach().flatten(1).norm(dim=1)
                self.state[id(p)] = (r, r.clone())
            optimizer.register_step_post_hook(lambda *args: self._after_step())
            self.hooked = True
        with torch.no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                r, rho = self.state[id(p)]
                w, g = p.flatten(1), p.grad.flatten(1)
                radial = (g * w).sum(1, keepdim=True) / r.pow(2).unsqueeze(1)
                g.sub_(radial * w).mul_((r / rho).unsqueeze(1))
                w.mul_((rho / r).unsqueeze(1))  # the optimizer steps v

    @torch.no_grad()
    def _after_step(self) -> None:
        for p in self.params:
            r, rho = self.state[id(p)]
            w = p.flatten(1)
            rho.copy_(w.norm(dim=1))
            w.mul_((r / rho).unsqueeze(1))  # the forward pass sees the direction at norm r


class CalibratedGains(L.Callback):
    """The ``gain_reparam=1`` option: every folded scale trained as BatchNorm trains its gamma.

    Calibration sets each folded scale to ``s0 = target / std(conv(x, w))``, which is not 1 (0.4-4.3 on the
    Fashion-MNIST networks). A learned ``s`` then gets ``1 / s0`` of the gradient BatchNorm's gamma would get and
    ``1 / s0**2`` of its relative step, and weight decay pulls it to an equilibrium ``s0**2`` times smaller. Here,
    once the calibration is complete, ``s0`` becomes a fixed per-filter factor (a buffer) and the optimizer trains
    ``gamma = s / s0`` (1 at the start, as BatchNorm's), its momentum converted to the new units. List it after
    :class:`~lightning_msr.MeanShiftRejection`.
    """

    def __init__(self) -> None:
        self.done = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        import types

        from lightning_msr.nn.scaled_conv import is_scaled_conv, scaled_conv

        if self.done:
            return
        msr = next(cb for cb in trainer.callbacks if type(cb).__name__ == "MeanShiftRejection")
        report = msr.engine.calibration if msr.engine is not None else None
        if report is None or not report.complete:
            return

        def forward(self: Any, x: Tensor) -> Tensor:
            options = {k: getattr(self, k) for k in ("stride", "padding", "dilation", "groups", "padding_mode")}
            return scaled_conv(x, self.weight, self.scale * self.gain0, self.bias, **options)

        optimizer = trainer.optimizers[0]
        with torch.no_grad():
            for m in pl_module.modules():
                if not is_scaled_conv(m):
                    continue
                s0 = m.scale.abs().clamp_min(1e-12)
                m.register_buffer("gain0", s0.clone())
                m.scale.div_(s0)
                momentum = optimizer.state.get(m.scale, {}).get("momentum_buffer")
                if momentum is not None:  # a gradient in gamma's units is s0 times the one in s's
                    momentum.mul_(s0)
                m.forward = types.MethodType(forward, m)
        self.done = True
