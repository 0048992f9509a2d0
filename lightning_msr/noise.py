"""Per-(sample, channel) noise: the explicit regulariser that takes over from BatchNorm's minibatch noise.

BatchNorm normalises every activation map with statistics of the current minibatch, so the same sample is
scaled and shifted a little differently every time it is seen. Ruff, Beck and Bach ("Training Deep Neural
Networks Without Minibatch Statistics or Normalization", arXiv:1911.13173) remove the minibatch statistics
and put that "deep data augmentation" back explicitly: during training, every ``(sample, channel)`` map is
multiplied by a random factor ``U(1 - scale, 1 + scale)`` (clamped to ``[0, 2]``) and optionally shifted by
``U(-shift, shift)``. In evaluation the network is left untouched, so the train graph is the test graph.

:func:`channel_noise` is that operation on one tensor, usable in any training loop; the
:class:`~lightning_msr.NoiseInjection` callback applies it at the outputs of a model's convolutions.

Example::

    >>> import torch
    >>> from lightning_msr.noise import channel_noise
    >>> x = torch.ones(2, 3, 4, 4)
    >>> y = channel_noise(x, scale=0.1, generator=torch.Generator().manual_seed(0))
    >>> bool(((y - 1).abs() <= 0.1).all())
    True
    >>> bool((y == y[..., :1, :1]).all())  # one factor per (sample, channel) map
    True
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_msr._checks import _check_bool, _check_noise_levels
from lightning_msr.exceptions import MSRConfigurationError

__all__ = ["channel_noise"]

Distribution = Literal["uniform", "gaussian"]  # as `_checks._check_noise_levels` allows


def _draw(x: Tensor, shape: tuple[int, ...], center: float, spread: float, distribution: str, generator) -> Tensor:
    """One ``shape`` tensor of ``U(center - spread, center + spread)`` or ``N(center, spread)`` like ``x``."""
    if generator is None or generator.device == x.device:
        out = x.new_empty(shape)
    else:  # a generator on another device (e.g. the CPU for an accelerator without its own generators)
        out = torch.empty(shape, dtype=x.dtype, device=generator.device)
    if distribution == "uniform":
        out.uniform_(center - spread, center + spread, generator=generator)
    else:
        out.normal_(center, spread, generator=generator)
    return out.to(x.device, non_blocking=True)


def _channel_noise(
    x: Tensor,
    scale: float,
    shift: float,
    distribution: str,
    generator: Optional[torch.Generator],
    inplace: bool = False,
) -> Tensor:
    """:func:`channel_noise` without argument checks (the callback's hot path)."""
    if scale == 0.0 and shift == 0.0:
        return x
    # One value per (sample, channel), broadcast over the map: (N, C, 1, ..., 1).
    shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    factor = offset = None
    if scale > 0.0:
        factor = _draw(x, shape, 1.0, scale, distribution, generator)
        if distribution == "gaussian":  # a uniform factor with scale <= 1 is in [0, 2] already
            factor.clamp_(0.0, 2.0)
    if shift > 0.0:
        offset = _draw(x, shape, 0.0, shift, distribution, generator)
    if inplace:  # no new activation-sized buffer: the cheapest form when x is not needed elsewhere
        if factor is not None:
            x.mul_(factor)
        return x if offset is None else x.add_(offset)
    if offset is None:
        return x * factor
    if factor is None:
        return x + offset
    # offset + x * factor in one pass; the output keeps x's memory format (e.g. channels_last).
    return torch.addcmul(offset, x, factor)


def channel_noise(
    x: Tensor,
    scale: float = 0.1,
    shift: float = 0.0,
    distribution: Distribution = "uniform",
    generator: Optional[torch.Generator] = None,
    inplace: bool = False,
) -> Tensor:
    r"""Multiply every ``(sample, channel)`` map of ``x`` by a random factor and add a random offset.

    For ``x`` of shape ``(N, C, *spatial)`` this returns ``x * a + b`` where ``a`` and ``b`` have shape
    ``(N, C, 1, ..., 1)``, i.e. one value per map, constant over the map:

    * ``distribution="uniform"`` (the paper's): ``a ~ U(1 - scale, 1 + scale)``, ``b ~ U(-shift, shift)``;
      ``scale`` must be in ``[0, 1]`` so that ``a`` stays in ``[0, 2]``;
    * ``distribution="gaussian"``: ``a ~ N(1, scale)`` clamped to ``[0, 2]``, ``b ~ N(0, shift)``.

    The noise is built like ``x`` (device and dtype) and drawn from ``generator``; with a generator the
    global RNG is never touched. The gradient flows to ``x`` (the noise itself is a constant). With
    ``scale == shift == 0`` the very same tensor ``x`` is returned, so no operation is recorded.
    Tensors with 2 dims ``(N, C)`` get one value per element; more dims than 2 are all "spatial".

    Args:
        x: activations of shape ``(N, C, *spatial)``, floating point.
        scale: spread of the multiplicative factor around 1 (half-width for uniform, std for gaussian).
        shift: spread of the additive offset around 0 (half-width for uniform, std for gaussian).
        distribution: ``"uniform"`` or ``"gaussian"``.
        generator: the random generator to draw from, on ``x``'s device (or the CPU); ``None`` draws from
            PyTorch's default generator for that device.
        inplace: modify ``x`` in place instead of allocating a new tensor (faster, as ``nn.ReLU(inplace=True)``).
            Autograd raises if ``x`` was saved for a backward pass; anything else holding ``x`` sees the noise.

    Returns:
        The noisy tensor (or ``x`` itself when there is nothing to add).

    Raises:
        MSRConfigurationError: if ``scale``/``shift`` are negative or not finite, ``scale > 1`` with
            ``"uniform"``, ``distribution`` is unknown, ``inplace`` is not a bool, or ``x`` is not a
            floating-point tensor with at least 2 dims.

    Example::

        >>> import torch
        >>> from lightning_msr.noise import channel_noise
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.ones(8, 4, 5, 5, requires_grad=True)
        >>> y = channel_noise(x, scale=0.1, shift=0.2, generator=g)
        >>> y.shape, bool(((y - 1).abs() <= 0.1 + 0.2).all()), bool((y == y[..., :1, :1]).all())
        (torch.Size([8, 4, 5, 5]), True, True)
        >>> channel_noise(x, scale=0.0, shift=0.0) is x  # nothing to add: the same tensor, no new graph
        True
    """
    scale, shift = _check_noise_levels(distribution, scale, shift)
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        described = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise MSRConfigurationError(
            f"Expected `x` to be a floating-point tensor of shape (N, C, *spatial), but got {described}."
        )
    _check_bool("inplace", inplace)
    return _channel_noise(x, scale, shift, distribution, generator, inplace)
