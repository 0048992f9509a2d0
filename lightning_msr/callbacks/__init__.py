"""Lightning callbacks of lightning_msr: when to apply Mean Shift Rejection, noise and Deep Control."""

from lightning_msr.callbacks.deep_control import DeepControl
from lightning_msr.callbacks.mean_shift_rejection import MeanShiftRejection
from lightning_msr.callbacks.noise_injection import NoiseInjection

__all__ = ["DeepControl", "MeanShiftRejection", "NoiseInjection"]
