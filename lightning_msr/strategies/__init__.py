"""Training strategies of lightning_msr; importing this registers ``"ddp_msr"`` and ``"ddp_msr_spawn"``."""

from lightning_msr.strategies.ddp import MSRDDPStrategy

__all__ = ["MSRDDPStrategy"]
