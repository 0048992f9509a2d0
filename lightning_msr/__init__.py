"""lightning_msr: train convolutional networks without BatchNorm or minibatch statistics, by adding callbacks.

Mean Shift Rejection (Ruff, Beck, Bach, arXiv:1911.13173) and Deep Control (Ruff, arXiv:1706.03907) as
PyTorch Lightning callbacks, a DDP strategy without BatchNorm sync, and the pure tensor functions behind
them (:mod:`lightning_msr.functional`).

Example::

    >>> import lightning as L
    >>> import lightning_msr
    >>> trainer = L.Trainer(callbacks=[lightning_msr.MeanShiftRejection(), lightning_msr.NoiseInjection()],
    ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
    ...                     enable_model_summary=False)
"""

from lightning_msr import functional, nn, noise
from lightning_msr.callbacks import DeepControl, MeanShiftRejection, NoiseInjection
from lightning_msr.engine import DeepControlEngine, MSREngine, MSRSettings, NoiseEngine
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.noise import channel_noise
from lightning_msr.strategies import MSRDDPStrategy
from lightning_msr.surgery import Replacements, find_batchnorm, merge_scaled_convs, replace_batchnorm

__version__ = "0.1.0"

__all__ = [
    "DeepControl",
    "DeepControlEngine",
    "MSRConfigurationError",
    "MSRDDPStrategy",
    "MSREngine",
    "MSRSettings",
    "MSRWarning",
    "MeanShiftRejection",
    "NoiseEngine",
    "NoiseInjection",
    "Replacements",
    "__version__",
    "channel_noise",
    "find_batchnorm",
    "functional",
    "merge_scaled_convs",
    "nn",
    "noise",
    "replace_batchnorm",
]
