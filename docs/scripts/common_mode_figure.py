"""Draw docs/img/common_mode.png, the figure of the "Why Mean Shift Rejection" page.

Left: a constant (common-mode) offset added to the input of a stack of 3x3 conv + ReLU layers. With PyTorch's
default initialisation every kernel has a non-zero sum (DC gain), so the offset leaks into every layer's
output; with zero-mean kernels it is rejected exactly, at every depth. Circular padding keeps a constant
input constant at the borders, so what is plotted is the kernels' DC gain alone.

Right: a kernel that starts zero-mean does not stay zero-mean under plain SGD, because the gradients have a
common-mode part of their own; Mean Shift Rejection projects it out before every step. Trained on
scikit-learn's digits with the SmallCNN of the examples (no normalisation layer), SGD with momentum.

Both panels use the paper's kernel-wise groups (``mode="kernel"``): after a ReLU every channel carries its own
offset, which only zero-mean kernels reject; zero-mean filters (the callback's default ``mode="filter"``) reject
the part common to all input channels.

Run from the repository root (about half a minute on a CPU)::

    python docs/scripts/common_mode_figure.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.model import SmallCNN  # noqa: E402
from lightning_msr.functional import eligible_weights, mean_shift, project_mean_, zero_mean_init_  # noqa: E402

OUT = ROOT / "docs" / "img" / "common_mode.png"


def offset_leak(zero_mean: bool, depth: int = 8, channels: int = 16, seed: int = 0) -> list[float]:
    """Relative change of each layer's output when a constant 1.0 is added to the input image."""
    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1, padding_mode="circular", bias=False)
        for i in range(depth)
    ]
    if zero_mean:
        generator = torch.Generator().manual_seed(seed)
        for conv in layers:
            zero_mean_init_(conv.weight, magnitude=2**0.5, generator=generator, mode="kernel")
    x = torch.randn(4, 1, 32, 32)
    a, b, leaks = x, x + 1.0, []
    with torch.no_grad():
        for conv in layers:
            a, b = F.relu(conv(a)), F.relu(conv(b))
            leaks.append(float((b - a).norm() / a.norm()))
    return leaks


def kernel_drift(project: bool, steps: int = 300, seed: int = 0) -> list[float]:
    """Worst layer's ``mean_shift`` over SGD steps, starting from zero-mean kernels, with or without projection."""
    torch.manual_seed(seed)
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    model = SmallCNN(norm="affine")
    weights = [w.parameter for w in eligible_weights(model)]
    generator = torch.Generator().manual_seed(seed)
    for w in weights:
        zero_mean_init_(w, generator=generator, mode="kernel")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    shifts, step = [], 0
    while step < steps:
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if project:
                project_mean_([w.grad for w in weights], mode="kernel")
            optimizer.step()
            shifts.append(max(float(mean_shift(w, mode="kernel")) for w in weights))
            step += 1
            if step == steps:
                break
    return shifts


def main() -> None:
    torch.set_num_threads(1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    floor = 1e-9  # below float32 rounding
    depth = range(1, 9)
    left.semilogy(depth, [max(v, floor) for v in offset_leak(False)], "o-", label="default init (kernel sums ≠ 0)")
    left.semilogy(depth, [max(v, floor) for v in offset_leak(True)], "s-", label="zero-mean kernels (float32 rounding)")
    left.set_xlabel("layer (3x3 conv + ReLU)")
    left.set_ylabel("relative output change")
    left.set_title("Input + constant offset: what reaches each layer")
    left.set_ylim(floor, 1e2)
    left.legend(loc="center right", fontsize=8)
    left.grid(alpha=0.3)

    plain, projected = kernel_drift(False), kernel_drift(True)
    right.semilogy(range(1, len(plain) + 1), [max(v, floor) for v in plain], label="plain SGD")
    right.semilogy(
        range(1, len(projected) + 1), [max(v, floor) for v in projected], label="SGD + mean projection (MSR)"
    )
    right.set_xlabel("SGD step")
    right.set_ylabel("max kernel mean / weight RMS")
    right.set_title("Zero-mean kernels under training (digits)")
    right.set_ylim(floor, 1e2)
    right.legend(loc="center right", fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
