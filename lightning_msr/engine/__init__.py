"""The engine: Mean Shift Rejection and noise injection on any model and optimizer, through PyTorch's own hooks.

:class:`MSREngine` and :class:`NoiseEngine` do the work of the ``MeanShiftRejection`` and ``NoiseInjection``
callbacks without a Trainer (Lightning Fabric, plain PyTorch loops); the callbacks are adapters that create them
and decide *when*. :class:`MSRSettings` defines the settings both take. The per-step work is in
:mod:`lightning_msr.engine.step`, the first-batch work in :mod:`lightning_msr.engine.first_batch`.
"""

from lightning_msr.engine.deep_control import DeepControlEngine, DeepControlSettings
from lightning_msr.engine.msr import MSREngine
from lightning_msr.engine.noise import NoiseEngine, NoiseSettings
from lightning_msr.engine.settings import MSRSettings

__all__ = ["DeepControlEngine", "DeepControlSettings", "MSREngine", "MSRSettings", "NoiseEngine", "NoiseSettings"]
