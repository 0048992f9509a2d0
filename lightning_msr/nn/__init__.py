"""Layers of lightning_msr (usable in any ``nn.Module``)."""

from lightning_msr.nn.gain_control import AutomaticGainControl

__all__ = ["AutomaticGainControl"]
