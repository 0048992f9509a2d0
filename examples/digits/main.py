"""LightningCLI for the digits example: switch BatchNorm, Mean Shift Rejection and noise on from flags or YAML.

Run from the repository root::

    # the baseline: SmallCNN with BatchNorm
    python examples/digits/main.py fit --config examples/digits/config_batchnorm.yaml

    # the same network without batch statistics, with MSR and noise, from flags alone
    python examples/digits/main.py fit --model.norm=affine \\
        --trainer.callbacks+=lightning_msr.MeanShiftRejection --trainer.callbacks.alpha=1.0 \\
        --trainer.callbacks+=lightning_msr.NoiseInjection --trainer.callbacks.scale=0.1

    # or from a YAML file, then test the trained model
    python examples/digits/main.py fit --config examples/digits/config_msr.yaml
    python examples/digits/main.py test --config examples/digits/config_msr.yaml --ckpt_path=...

    # two CPU processes without SyncBatchNorm or buffer broadcasts
    python examples/digits/main.py fit --config examples/digits/config_msr.yaml \\
        --trainer.strategy=ddp_msr --trainer.accelerator=cpu --trainer.devices=2

    # every flag, and the full resolved configuration
    python examples/digits/main.py fit --help
    python examples/digits/main.py fit --config examples/digits/config_msr.yaml --print_config
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
from examples.digits.data import DigitsDataModule  # noqa: E402
from examples.digits.model import SmallCNN  # noqa: E402


def cli_main(args: ArgsType = None, run: bool = True, **kwargs: object) -> LightningCLI:
    """Build (and with ``run=True`` execute) the digits CLI; ``args`` replaces ``sys.argv[1:]`` when given.

    Args:
        args: command-line arguments (a list of strings or a dict), ``None`` reads ``sys.argv``.
        run: run the subcommand (``fit``, ``validate``, ``test``, ``predict``); with ``False`` only build
            the model, datamodule and Trainer from the arguments (no subcommand is expected then).
        kwargs: further keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`.
    """
    kwargs.setdefault("seed_everything_default", 0)
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LightningCLI(SmallCNN, DigitsDataModule, args=args, run=run, **kwargs)


def main(argv: Optional[list[str]] = None) -> None:
    cli_main(argv)


if __name__ == "__main__":
    main()
