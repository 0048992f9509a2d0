"""Layers of lightning_msr (usable in any ``nn.Module``) and their functional forms."""

from lightning_msr.nn.affine import ChannelAffine, channel_affine
from lightning_msr.nn.gain_control import AutomaticGainControl, automatic_gain_control

__all__ = ["AutomaticGainControl", "ChannelAffine", "automatic_gain_control", "channel_affine"]
