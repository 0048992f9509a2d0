"""Layers of lightning_msr (usable in any ``nn.Module``) and their functional forms."""

from lightning_msr.nn.affine import ChannelAffine, channel_affine
from lightning_msr.nn.gain_control import AutomaticGainControl, automatic_gain_control
from lightning_msr.nn.norm_act import NormAct
from lightning_msr.nn.scaled_conv import ScaledConv1d, ScaledConv2d, ScaledConv3d

__all__ = [
    "AutomaticGainControl",
    "ChannelAffine",
    "NormAct",
    "ScaledConv1d",
    "ScaledConv2d",
    "ScaledConv3d",
    "automatic_gain_control",
    "channel_affine",
]
