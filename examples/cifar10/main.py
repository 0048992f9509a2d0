"""LightningCLI for CIFAR-10 with a torchvision ResNet-18: BatchNorm, or Mean Shift Rejection from flags or YAML.

Run from the repository root (the first run downloads CIFAR-10 into ``--data.data_dir``, 163 MB)::

    # the baseline: ResNet-18 with BatchNorm
    python examples/cifar10/main.py fit --config examples/cifar10/config_batchnorm.yaml

    # the same, unchanged model: MSR takes BatchNorm out at fit setup, noise replaces its regularisation
    python examples/cifar10/main.py fit --config examples/cifar10/config_batchnorm.yaml \\
        --trainer.callbacks+=lightning_msr.MeanShiftRejection --trainer.callbacks.batchnorm=replace \\
        --trainer.callbacks+=lightning_msr.NoiseInjection

    # or everything from one file, on 2 GPUs without SyncBatchNorm or buffer broadcasts
    python examples/cifar10/main.py fit --config examples/cifar10/config_msr.yaml \\
        --trainer.strategy=ddp_msr --trainer.devices=2
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # run as a script from anywhere: make `examples` importable
    sys.path.insert(0, str(_ROOT))

from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

import lightning_msr  # noqa: E402, F401  (registers the "ddp_msr" strategies)
from examples.cifar10.data import CIFAR10DataModule  # noqa: E402
from examples.cifar10.model import CIFARResNet  # noqa: E402


def cli_main(args: ArgsType = None, run: bool = True, **kwargs: object) -> LightningCLI:
    """Build (and with ``run=True`` execute) the CIFAR-10 CLI; ``args`` replaces ``sys.argv[1:]`` when given.

    Args:
        args: command-line arguments (a list of strings or a dict), ``None`` reads ``sys.argv``.
        run: run the subcommand; with ``False`` only build the model, datamodule and Trainer.
        kwargs: further keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`.
    """
    kwargs.setdefault("seed_everything_default", 0)
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LightningCLI(CIFARResNet, CIFAR10DataModule, args=args, run=run, **kwargs)


def main(argv: Optional[list[str]] = None) -> None:
    cli_main(argv)


if __name__ == "__main__":
    main()
