"""Data-dependent initialisation: give a BatchNorm-free network BatchNorm's signal at initialisation.

A BatchNorm in training mode normalises every channel of its input with the statistics of the batch, so at
initialisation every layer of a BatchNorm network passes on a signal of unit variance, whatever the depth, the
fan-in or the filters. Zero-mean kernels of a fixed norm do not: on natural images, whose spatial spectrum is
mostly low-frequency, a zero-mean kernel is a high-pass filter, and the signal of a converted torchvision model
shrinks by orders of magnitude on its way to the classifier (10^-4 to 10^-14 measured in the model zoo), while
residual sums without normalisation grow with every block.

This module fixes the start once, from one batch, in the spirit of data-dependent initialisation of
weight-normalised layers (Salimans & Kingma 2016) and LSUV (Mishkin & Matas 2016): during one forward pass every
*gain site* -- a :class:`~lightning_msr.nn.affine.ChannelAffine` or
:class:`~lightning_msr.nn.AutomaticGainControl` left by :func:`~lightning_msr.replace_batchnorm`, or a conv
that no such layer follows -- sets its per-channel scale and bias so that its output has, on that batch, the
mean and standard deviation a BatchNorm would give it (the layer's bias and ``|scale|``: 0 and 1 for a fresh
BatchNorm). The sites are visited in the order the forward pass reaches them, so every layer is calibrated on
the already calibrated signal of the layers before it. Afterwards the parameters are ordinary parameters again:
the train graph is fixed and batch-independent, and nothing is recomputed.

Residual networks need one more thing. The sum ``x + f(x)`` adds the variance of the branch at every block;
BatchNorm networks live with that because every downsampling stage renormalises, normaliser-free networks scale
the branch down (SkipInit, De & Smith 2020; Fixup, Zhang et al. 2019; NF-ResNets' ``alpha``, Brock et al.
2021). :func:`residual_branch_ends` finds, from the model's ``torch.fx`` graph, the gain site that ends each
residual branch (the layer torchvision's ``zero_init_residual`` zeroes), and :func:`calibrate` gives it the
standard deviation ``residual_scale`` instead of 1.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_msr import replace_batchnorm
    >>> from lightning_msr.calibration import calibrate
    >>> from lightning_msr.functional import zero_mean_init_
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    >>> _ = replace_batchnorm(net)
    >>> for conv in (net[0], net[3]):
    ...     _ = zero_mean_init_(conv.weight, generator=torch.Generator().manual_seed(0))
    >>> x = torch.rand(4, 3, 16, 16)
    >>> with torch.no_grad(), calibrate(net) as report:
    ...     y = net(x)
    >>> len(report.calibrated), round(float(y.std()), 2)  # both convs and both gains
    (4, 1.0)
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msr._checks import _check_in_range, _check_names, _check_positive_int
from lightning_msr.nn.affine import ChannelAffine
from lightning_msr.nn.gain_control import AutomaticGainControl

__all__ = [
    "CalibrationReport",
    "calibrate",
    "gain_parameters",
    "gain_sites",
    "residual_branch_ends",
    "watch_signal",
]

# Each channel's mean and variance are shrunk towards its layer's with the weight of this many values (so a
# channel seen 8 times is mostly the layer's, one seen 2048 times mostly its own): a scale frozen from a few
# values is mostly noise, and it is multiplied through depth.
_SHRINK = 64.0
# Elements per float64 chunk when the statistics are summed (8 MiB), bounding the calibration's transient memory.
_CHUNK = 1 << 20
# A channel's variance is never taken below this fraction of its layer's mean variance (dead or nearly
# constant channels would otherwise get enormous gains).
_VARIANCE_FLOOR = 1e-2
# The signal check: a layer whose output RMS is this far below or above the input's is reported.
_VANISHING, _EXPLODING = 1e-3, 1e3

Reduce = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------------- sites
def gain_parameters(module: nn.Module) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """``(scale, bias)`` of a per-channel gain layer whose output is ``scale[c] * z[:, c] + bias[c]``, else ``None``.

    Gain layers are what replaces BatchNorm: :class:`~lightning_msr.nn.affine.ChannelAffine` (``weight``,
    ``bias``), :class:`~lightning_msr.nn.AutomaticGainControl` (``gain``, ``bias``; ``z`` is the input minus
    ``beta`` times its map mean) and convs with a folded per-output-channel ``scale``.

    Example::

        >>> from torch import nn
        >>> from lightning_msr.calibration import gain_parameters
        >>> from lightning_msr.nn import AutomaticGainControl
        >>> [p.shape for p in gain_parameters(AutomaticGainControl(4))], gain_parameters(nn.Conv2d(1, 1, 1))
        ([torch.Size([4]), torch.Size([4])], None)
    """
    if isinstance(module, ChannelAffine):
        return module.weight, module.bias
    if isinstance(module, AutomaticGainControl):
        return (module.gain, module.bias) if module.gain is not None else None  # gain folded into the conv
    # folded layers: a conv computing scale[o] * conv(x)[o] + bias[o] (read from `_parameters`: while torch.fx
    # traces, attribute access returns proxies)
    scale = module._parameters.get("scale") if isinstance(module, nn.modules.conv._ConvNd) else None
    if isinstance(scale, nn.Parameter) and scale.dim() == 1:
        return scale, module._parameters.get("bias")
    return None


def _is_conv(module: Optional[nn.Module]) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


@dataclass(frozen=True)
class _Site:
    name: str
    module: nn.Module
    # "gain": a per-channel scale and bias; "weight": a conv whose output is normalised (through its folded scale
    # or its filters); "kept": a conv of a normalised model that no normalisation followed, left as drawn
    kind: str
    residual: bool
    # a gain-less AutomaticGainControl right after a folded conv: the conv's scale is its gain, so the signal
    # that is normalised is the gain control's output
    through: Optional[nn.Module] = None


_TRANSPARENT_MODULES: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _transparent(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Nodes that pass their first input through unchanged at initialisation (identity, dropout, drop-path)."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, AutomaticGainControl) and module.gain is None:
            return True  # its gain was folded into the conv before it: that conv carries the branch's scale
        return isinstance(module, _TRANSPARENT_MODULES) or type(module).__name__ in ("StochasticDepth", "DropPath")
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in ("stochastic_depth", "drop_path", "dropout")
    return node.op == "call_method" and node.target in ("contiguous", "clone")


class _LeafTracer(torch.fx.Tracer):
    """Treat gain layers (and folded convs) as leaves, like ``torch.nn``'s own modules."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            _is_conv(m)
            or gain_parameters(m) is not None
            or isinstance(m, AutomaticGainControl)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _traced_graphs(model: nn.Module, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, nn.Module, Any]]:
    """``(prefix, module, graph)`` for the largest submodules that ``torch.fx`` can trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(model)
        yield prefix, model, graph
        return
    except Exception:  # not traceable as a whole (data-dependent control flow, no forward, ...): try the parts
        pass
    if depth > 12:
        return
    for name, child in model.named_children():
        yield from _traced_graphs(child, f"{prefix}{name}.", depth + 1)


def _ancestors(node: Any) -> set:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _branch_ends(model: nn.Module) -> set[str]:
    """From the fx graphs: the layers that end a residual branch (see :func:`residual_branch_ends`)."""
    branch_ends: set[str] = set()
    for prefix, module, graph in _traced_graphs(model):
        modules = dict(module.named_modules())

        def source(node: Any, modules: dict = modules) -> Any:
            while _transparent(node, modules) and node.args and isinstance(node.args[0], torch.fx.Node):
                node = node.args[0]
            return node

        def convs_in(nodes: set, modules: dict = modules) -> int:
            return sum(
                1 for n in nodes if n.op == "call_module" and isinstance(modules.get(n.target), nn.modules.conv._ConvNd)
            )

        for node in graph.nodes:
            is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
                node.op == "call_method" and node.target in ("add", "add_")
            )
            inputs = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            if not is_add or len(inputs) != 2:
                continue
            a, b = (source(n) for n in inputs)
            up_a, up_b = _ancestors(a) | {a}, _ancestors(b) | {b}
            only_a, only_b = convs_in(up_a - up_b), convs_in(up_b - up_a)
            # the branch is the input with more convs of its own; the other one is the shortcut
            branch, own, other = (a, only_a, only_b) if only_a > only_b else (b, only_b, only_a)
            site = modules.get(branch.target) if branch.op == "call_module" else None
            if own > other and site is not None and (gain_parameters(site) is not None or _is_conv(site)):
                branch_ends.add(prefix + branch.target)
    return branch_ends


def residual_branch_ends(model: nn.Module) -> list[str]:
    """Qualified names of the layers that end a residual branch: the last gain (or conv) before ``x + f(x)``.

    Found from the model's ``torch.fx`` graph (submodules are traced one by one where the whole model does not
    trace): at every addition of two tensors, the input with more convolutions of its own (not shared with the
    other input) is the branch, the other the shortcut, and the gain layer -- or, in a normaliser-free model,
    the conv -- that produces the branch (through dropout or drop-path) is its end. In a torchvision ResNet
    these are the layers that ``zero_init_residual`` zeroes (``bn2`` / ``bn3``, after BatchNorm surgery).

    Args:
        model: any module; it is traced, never changed.

    Example::

        >>> import torchvision
        >>> from lightning_msr import replace_batchnorm
        >>> from lightning_msr.calibration import residual_branch_ends
        >>> net = torchvision.models.resnet18()
        >>> _ = replace_batchnorm(net)
        >>> residual_branch_ends(net)[:3]
        ['layer1.0.bn2', 'layer1.1.bn2', 'layer2.0.bn2']
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(_branch_ends(model), key=lambda n: order.get(n, len(order)))


def _followers(model: nn.Module) -> dict[str, nn.Module]:
    """From the fx graphs: ``{conv name: the gain layer it feeds}`` for every conv whose output goes (through
    identity, dropout, ...) to a per-channel gain layer, or to a gain-less gain control, and to nothing else."""
    followers: dict[str, nn.Module] = {}
    for prefix, module, graph in _traced_graphs(model):
        modules = dict(module.named_modules())
        for node in graph.nodes:
            if node.op != "call_module" or not _is_conv(modules.get(node.target)):
                continue
            user = node
            while len(user.users) == 1:
                (user,) = user.users
                target = modules.get(user.target) if user.op == "call_module" else None
                if isinstance(target, AutomaticGainControl) or (target is not None and gain_parameters(target)):
                    followers[prefix + node.target] = target
                    break
                if not _transparent(user, modules):
                    break
    return followers


def _find_sites(model: nn.Module, convs: Optional[Sequence[nn.Module]], exclude: Sequence[str]) -> list[_Site]:
    branch_ends = _branch_ends(model)
    followers = _followers(model)
    allowed = None if convs is None else {id(c) for c in convs}
    # In a model that was normalised (its BatchNorm replaced by gain layers or folded scales), a conv that no
    # gain follows was not normalised in the BatchNorm model either: a squeeze-and-excitation gate, a conv head.
    # Normalising such a conv over the batch (its maps are often 1x1) fits the few samples of the calibrating
    # batches and multiplies the error through every gated block; it is left at its drawn magnitude instead.
    normalised = any(gain_parameters(m) is not None for m in model.modules())
    sites = []
    for name, module in model.named_modules():
        if any(fnmatchcase(name, p) for p in exclude):
            continue
        gain = gain_parameters(module)
        if gain is not None and not isinstance(module, nn.modules.conv._ConvNd):
            if not gain[0].requires_grad:
                continue  # a frozen gain (e.g. of a frozen pretrained backbone) is the user's, not ours
            sites.append(_Site(name, module, "gain", name in branch_ends))
        elif isinstance(module, nn.modules.conv._ConvNd) and (allowed is None or id(module) in allowed):
            follower = followers.get(name)
            through = follower if isinstance(follower, AutomaticGainControl) and follower.gain is None else None
            if gain is None and follower is None and normalised:
                sites.append(_Site(name, module, "kept", False))
                continue
            # a conv that ends a branch itself (no gain after it) is scaled down; one followed by a gain is not
            sites.append(_Site(name, module, "weight", name in branch_ends, through if gain is not None else None))
    return sites


def gain_sites(model: nn.Module, exclude: Optional[Sequence[str]] = None) -> dict[str, str]:
    """What :func:`calibrate` would calibrate: ``{name: "gain" | "weight" | "kept" | "gain, residual" | ...}``.

    ``"gain"`` sites are per-channel scale-and-bias layers (``ChannelAffine``, ``AutomaticGainControl``);
    ``"weight"`` sites are the convs: a conv with a folded per-channel scale gets the normalisation in that scale,
    any other conv in its filters (whether or not a gain follows, which then corrects what is left);
    ``"kept"`` convs are those of a normalised model (one with gain layers or folded scales) that no gain layer
    follows -- they were not normalised in the BatchNorm model either (squeeze-and-excitation gates, conv heads)
    -- and keep their drawn magnitude; ``residual`` marks the end of a residual branch (see
    :func:`residual_branch_ends`).

    Args:
        model: the model (never changed).
        exclude: module-name patterns (``fnmatch`` syntax) to leave out.

    Example::

        >>> from torch import nn
        >>> from lightning_msr.calibration import gain_sites
        >>> gain_sites(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
        {'0': 'weight', '2': 'weight'}
        >>> from lightning_msr.nn.affine import ChannelAffine
        >>> gate = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelAffine(8), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1))
        >>> gain_sites(gate)  # the last conv, a gate on pooled features, had no BatchNorm after it
        {'0': 'weight', '1': 'gain', '3': 'kept'}
    """
    patterns = _check_names("exclude", exclude)
    return {s.name: s.kind + (", residual" if s.residual else "") for s in _find_sites(model, None, patterns)}



# ----------------------------------------------------------------------------------------------- statistics
def _normalising_factors(mean: Tensor, variance: Tensor, n: float) -> tuple[Tensor, Tensor]:
    """``(1 / std, mean)`` per channel, as a BatchNorm in training mode would use them, made robust to few values:
    each channel's mean and variance are shrunk towards its layer's (weight ``_SHRINK`` values against the
    channel's ``n``), the variance taken about the shrunk mean. A channel seen once (a 1x1 map at batch 1) is then
    normalised with its layer's statistics -- the spread over its channels -- instead of being left alone."""
    shrunk_mean = (n * mean + _SHRINK * mean.mean()) / (n + _SHRINK)
    variance = variance + (mean - shrunk_mean).square()
    layer = variance.mean()
    shrunk = ((n * variance + _SHRINK * layer) / (n + _SHRINK)).clamp(min=_VARIANCE_FLOOR * layer)
    return shrunk.rsqrt(), shrunk_mean


def _per_channel_view(t: Tensor, like: Tensor) -> Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


class _Statistics:
    """One site's pooled statistics: per-channel sums of its *raw* signal ``u`` -- the output with the site's own
    scale and bias taken out, so that passes made before and after the site was (re)calibrated pool -- over
    every calibrating pass, in float64, summed over processes."""

    _FIELDS = ("sums", "target_std", "target_mean", "factor")

    def __init__(self, state: Optional[dict[str, Tensor]] = None) -> None:
        self.sums: Optional[Tensor] = None
        self.target_std: Optional[Tensor] = None  # per channel, fixed at the first pass
        self.target_mean: Optional[Tensor] = None
        self.factor: Optional[Tensor] = None  # plain conv: the factor its filters carry so far
        for name, value in (state or {}).items():
            setattr(self, name, value.clone())

    def state(self) -> dict[str, Tensor]:
        return {f: getattr(self, f).detach().cpu().clone() for f in self._FIELDS if getattr(self, f) is not None}

    def to_(self, device: torch.device) -> None:
        """Where the layer is (restored statistics come from a checkpoint on the CPU)."""
        for name in self._FIELDS:
            value = getattr(self, name)
            if value is not None and value.device != device:
                setattr(self, name, value.to(device))

    def add(
        self, y: Tensor, reduce: Optional[Reduce], scale: Optional[Tensor] = None, bias: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, float]:
        """Pool the per-channel statistics of ``u = (y - bias) / scale`` (``u = y`` without them; 0 where the scale
        is 0) and return the pooled mean, variance and count. The sums of ``y`` and ``y**2`` are taken in float64
        over chunks of samples and turned into those of ``u`` per channel, so no float64 copy of the output exists:
        materialising ``u`` in float64 cost several activations and was the calibrating step's memory peak."""
        y = y.detach()
        dims = [d for d in range(y.dim()) if d != 1]
        n = float(y.numel() // y.shape[1])
        per_sample = max(1, y.numel() // max(y.shape[0], 1))
        first = y.new_zeros(y.shape[1], dtype=torch.float64)
        second = y.new_zeros(y.shape[1], dtype=torch.float64)
        for part in y.split(max(1, _CHUNK // per_sample), dim=0):
            part = part.double()
            first += part.sum(dim=dims)
            second += part.square_().sum(dim=dims)
        if bias is not None:
            b = bias.detach().double()
            second = second - 2.0 * b * first + n * b.square()
            first = first - n * b
        if scale is not None:
            s = scale.detach().double()
            zero = s == 0
            safe = torch.where(zero, torch.ones_like(s), s)
            first = torch.where(zero, torch.zeros_like(first), first / safe)
            second = torch.where(zero, torch.zeros_like(second), second / safe.square())
        count = torch.tensor([n], dtype=torch.float64, device=y.device)
        sums = torch.cat([count, first, second])
        if reduce is not None:
            sums = reduce(sums)
        self.sums = sums if self.sums is None else self.sums + sums
        channels = y.shape[1]
        n = float(self.sums[0])
        mean = self.sums[1 : 1 + channels] / n
        second = self.sums[1 + channels :] / n
        return mean, (second - mean.square()).clamp(min=0.0), n


@dataclass
class CalibrationReport:
    """What a :func:`calibrate` block did.

    Attributes:
        calibrated: names of the layers whose scale (and bias) were set, in the order they were first reached.
        residual: the subset that ends a residual branch (given ``residual_scale``).
        failed: ``{name: why}`` for layers that could not be calibrated (no signal, non-finite values).
        kept: ``{name: why}`` for convs left at their drawn magnitude on purpose: in a normalised model, the convs
            that no gain layer follows (squeeze-and-excitation gates, conv heads), which BatchNorm did not
            normalise either.
        adjusted: ``{name: what}`` for layers changed beyond their scale and bias: a gain control on 1x1 maps
            (``AutomaticGainControl``), whose mean subtraction would remove the whole signal, gets ``beta = 0``.
        rms: ``{name: RMS}`` of each layer's output after calibration, and of each ``Linear``'s input (the
            "head"), on the first calibrating pass, in the order they were reached.
        input_rms: RMS of the first input the pass saw (the data), the reference of :meth:`signal_problem`.
        samples: samples (first dim of the input, summed over processes) the statistics pool so far.
        passes: calibrating forward passes so far.
        complete: ``samples`` reached the number asked for; the pass that reached it was the last.

    Example::

        >>> from lightning_msr.calibration import CalibrationReport
        >>> report = CalibrationReport(rms={"conv1": 1.0, "fc": 1e-9}, input_rms=1.0)
        >>> report.signal_problem()
        ('fc', 1e-09, 'vanishes')
    """

    calibrated: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    adjusted: dict[str, str] = field(default_factory=dict)
    rms: dict[str, float] = field(default_factory=dict)
    input_rms: Optional[float] = None
    samples: int = 0
    passes: int = 0
    complete: bool = False
    _sites: dict = field(default_factory=dict, repr=False)  # site name -> its pooled statistics
    _anchor: list = field(default_factory=lambda: [None], repr=False)  # the site whose call starts a pass

    def state_dict(self) -> dict[str, Any]:
        """What a run resumed before the calibration is complete needs to go on exactly where this one is: the
        report and every layer's pooled statistics (CPU tensors). Pass it to :func:`calibrate` as ``state``."""
        return {
            "calibrated": list(self.calibrated),
            "residual": list(self.residual),
            "failed": dict(self.failed),
            "adjusted": dict(self.adjusted),
            "rms": dict(self.rms),
            "input_rms": self.input_rms,
            "samples": self.samples,
            "passes": self.passes,
            "complete": self.complete,
            "anchor": self._anchor[0],
            "sites": {name: stats.state() for name, stats in self._sites.items()},
        }

    def signal_problem(self) -> Optional[tuple[str, float, str]]:
        """``(layer, rms, "vanishes" | "explodes")`` for the first layer whose signal is more than 1000x below or
        above the input's (or not finite), else ``None``."""
        ref = self.input_rms if self.input_rms and math.isfinite(self.input_rms) else 1.0
        for name, value in self.rms.items():
            if name in self.residual:
                continue  # scaled down on purpose (``residual_scale``)
            if not math.isfinite(value) or value > _EXPLODING * ref:
                return name, value, "explodes"
            if value < _VANISHING * ref:
                return name, value, "vanishes"
        return None


def _rms(t: Any) -> Optional[float]:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.numel() == 0:
        return None
    # float32 accumulation (a diagnostic): a float64 copy and its square would cost 4 activations
    return float(torch.linalg.vector_norm(t.detach().float())) / math.sqrt(t.numel())


def _no_signal(mean: Tensor, variance: Tensor) -> Optional[str]:
    """Why a layer's output cannot be normalised, or ``None``."""
    if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
        return "its output is not finite"
    if float(variance.max()) == 0.0:
        return "its output is constant: no signal reaches it"
    return None


def _scale_output_channels_(module: nn.modules.conv._ConvNd, factor: Tensor) -> None:
    """Multiply every output channel's filter of a conv (``ConvTransposeNd`` included) by ``factor[o]``."""
    weight = module.weight
    if not module.transposed:  # (out, in / groups, *k)
        weight.mul_(factor.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
        return
    # (in, out / groups, *k): output channel j * out_g + r of group j reads weight[j * in_g:(j + 1) * in_g, r]
    groups = module.groups
    view = weight.view(groups, weight.shape[0] // groups, weight.shape[1], -1)
    view.mul_(factor.view(groups, 1, weight.shape[1], 1).to(weight.dtype))


def _without_scale(y: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``(y - bias) / scale`` per channel (0 where the scale is 0: such a channel stays 0)."""
    y = y.double()
    if bias is not None:
        y = y - _per_channel_view(bias.detach().double(), y)
    scale = scale.detach().double()
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(_per_channel_view(scale == 0, y), torch.zeros_like(y), y / _per_channel_view(safe, y))


def _single_element_maps(gain_control: AutomaticGainControl, x: Tensor, name: str, adjusted: dict[str, str]) -> None:
    """A 1x1 map's mean is the map itself: Deep Control's mean subtraction would remove the whole signal, so the
    gain control that reads such maps gets ``beta = 0`` (once, said in the report)."""
    if math.prod(x.shape[2:]) == 1 and bool((gain_control.beta != 0).any()):
        gain_control.beta.zero_()
        adjusted[name] = "its gain control reads 1x1 maps, whose mean is the signal itself: beta set to 0"


@torch.no_grad()
def _calibrate_site(
    site: _Site, stats: _Statistics, args: tuple, target: float, reduce: Optional[Reduce], adjusted: dict[str, str]
) -> Optional[str]:
    """Measure the site's raw signal on this pass, pool it, and set its scale and bias (or filters) from the pooled
    statistics so that its output has BatchNorm's mean and standard deviation; returns why not, if it could not.

    Gain layers (``y = s * z + b``) get mean ``b0`` and standard deviation ``target * |s0|`` (their values at the
    first pass: 0 and 1 for a fresh BatchNorm); a conv with a folded scale gets mean 0 and ``target`` through its
    scale (its filters keep their drawn norm, BatchNorm's own parametrisation ``(W x) / std``), measured after the
    gain-less gain control that follows it, if any; any other conv through its filters."""
    module = site.module
    if isinstance(module, AutomaticGainControl):
        _single_element_maps(module, args[0], site.name, adjusted)
    y = module.forward(*args)  # forward(): no hooks
    if site.through is not None:  # the gain control after the conv reads the conv's output
        _single_element_maps(site.through, y, site.name, adjusted)
    stats.to_(y.device)
    folded = gain_parameters(module)
    if site.kind == "gain" or folded is not None:
        scale, bias = folded  # type: ignore[misc]
        if site.kind == "gain" and bool((scale == 0).all()):
            return None  # a gain the user (or zero_init_residual) set to zero stays zero
        raw: tuple = (y, scale, bias)
        if site.through is not None:  # the gain control's mean subtraction, without its bias: u itself is needed
            u = _without_scale(y, scale, bias)
            beta = _per_channel_view(site.through.beta.detach().double(), u)
            raw = (u - beta * u.mean(dim=tuple(range(2, u.dim())), keepdim=True), None, None)
    else:
        if stats.factor is None:
            stats.factor = torch.ones(y.shape[1], dtype=torch.float64, device=y.device)
        raw = (y, stats.factor, module.bias)
    if stats.target_std is None:
        if site.kind == "gain":
            stats.target_std = target * scale.detach().double().abs()
            stats.target_mean = torch.zeros_like(stats.target_std) if bias is None else bias.detach().double()
        else:
            stats.target_std = torch.full((y.shape[1],), target, dtype=torch.float64, device=y.device)
            stats.target_mean = torch.zeros_like(stats.target_std)
    mean, variance, n = stats.add(raw[0], reduce, scale=raw[1], bias=raw[2])
    why = _no_signal(mean, variance)
    if why:
        return why
    inv_std, mean = _normalising_factors(mean, variance, n)
    factor = stats.target_std * inv_std  # new output = factor * (u - mean) + target mean
    if site.kind == "gain" or folded is not None:
        scale.copy_((scale.detach().double().sign() * factor).to(scale.dtype))
    else:
        _scale_output_channels_(module, factor / stats.factor)
        stats.factor = factor
        bias = module.bias
    if bias is not None:
        bias.copy_((stats.target_mean - factor * mean).to(bias.dtype))
    return None


@contextlib.contextmanager
def calibrate(
    model: nn.Module,
    *,
    residual_scale: float = 0.3,
    convs: Optional[Sequence[nn.Module]] = None,
    exclude: Optional[Sequence[str]] = None,
    reduce: Optional[Reduce] = None,
    samples: int = 1,
    state: Optional[dict[str, Any]] = None,
) -> Iterator[CalibrationReport]:
    """Calibrate ``model`` on the forward passes run inside the ``with`` block, as BatchNorm would start it.

    Just before it runs, every conv (of ``convs``) computes its output on the batch and scales each output filter
    (and shifts its bias) so that the output channel has mean 0 and standard deviation 1 -- what a BatchNorm in
    training mode would make of it. Every per-channel gain layer after it (see :func:`gain_sites`) then corrects
    what is left, e.g. the share of the signal that Deep Control's mean subtraction removes: its output gets
    mean = its bias and standard deviation = ``|scale|`` (a fresh BatchNorm's 0 and 1; a scale set to 0 stays
    0). The end of every residual branch gets standard deviation ``residual_scale`` times that (default 0.3, as
    ``MeanShiftRejection``'s; 0: the block starts as the identity, SkipInit). In a normalised model, convs that no
    gain layer follows (squeeze-and-excitation gates, conv heads) are not normalised: BatchNorm did not normalise
    them either, and normalising a gate's 1x1 maps over a few samples fits those samples.

    Where the conv carries its own per-channel scale (a :class:`~lightning_msr.nn.ScaledConv2d`, BatchNorm
    folded into it), that scale takes the normalisation and the filters keep their drawn norm: this is
    BatchNorm's own parametrisation, ``scale * (W x) / std``, so every filter starts with the gradient, relative
    to its norm, that BatchNorm would give it. Scaling the filters instead multiplies that relative gradient by
    ``std ** 2`` -- hundreds of times too small in a layer whose signal had shrunk -- and measured 1-4 points
    worse on Fashion-MNIST. Other convs have nothing else to hold the scale: their filters are scaled. The
    gradient a large scale gives its filters is kept in bounds by ``MeanShiftRejection``'s adaptive clipping.

    **Pooling.** A scale frozen from a few samples fits them, and the error multiplies through depth: calibrated
    on 2 or 8 images, a deep EfficientNet passes 5-70x BatchNorm's signal on the next batch. So the statistics pool
    every pass until ``samples`` samples (the first dim of the input, summed over processes) have been seen; on
    each pass every layer is set again from all the statistics so far -- so the pass itself is normalised like
    BatchNorm in training mode, and the last one from all the samples. Within a layer, each channel's mean and
    variance are shrunk towards the layer's (per channel and spatial position pooled), so even a 1x1 map at
    batch 1 is calibrated, from its layer's statistics. Per channel, over the batch and the spatial dims, in
    float64, summed over processes by ``reduce``. Parameters are changed in place *before* they are used, so
    every pass computes with the calibrated model and its gradients are exact: the passes can be training steps.
    Filters are only scaled, so zero-mean kernels stay zero-mean. The hooks are removed when the block exits.

    Args:
        model: the model; its parameters are changed in place.
        residual_scale: standard deviation of each residual branch's end relative to the others, in ``[0, 1]``.
        convs: the convs whose filters are scaled (default: every conv); gain layers are always calibrated.
        exclude: module-name patterns (``fnmatch`` syntax) left alone.
        reduce: sums a float64 tensor over processes (e.g. an all-reduce), so every rank computes the same
            calibration from the global batch; ``None`` for one process.
        samples: pool the passes until this many samples have been seen (>= 1); the default, 1, calibrates on
            the next pass alone. Later passes inside the block leave the model alone.
        state: a :meth:`CalibrationReport.state_dict` of a calibration that stopped before it was complete (e.g.
            saved in a checkpoint): go on from it, bit for bit as if it had not stopped.

    Yields:
        A :class:`CalibrationReport`, filled in as the forward passes run (``complete`` once ``samples`` is
        reached).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.calibration import calibrate
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3))
        >>> with torch.no_grad(), calibrate(net, samples=16) as report:
        ...     for _ in range(4):  # four batches of 4 images: each pass pools all the statistics so far
        ...         y = net(torch.rand(4, 3, 12, 12) * 50)
        >>> report.calibrated, report.passes, report.complete, round(float(y.std(dim=(0, 2, 3)).mean()), 1)
        (['0', '2'], 4, True, 1.0)
    """
    residual_scale = _check_in_range("residual_scale", residual_scale, 0.0, 1.0)
    patterns = _check_names("exclude", exclude)
    samples = _check_positive_int("samples", samples)
    report = CalibrationReport()
    if state is not None:
        keys = ("calibrated", "residual", "failed", "adjusted", "rms", "input_rms", "samples", "passes", "complete")
        for key in keys:
            setattr(report, key, copy.copy(state[key]))
        report._anchor[0] = state["anchor"]
    sites = _find_sites(model, convs, patterns)
    for site in sites:
        if site.kind == "kept":
            report.kept[site.name] = "no gain layer follows it: BatchNorm did not normalise it either"
    handles: list[RemovableHandle] = []
    anchor = report._anchor  # the site reached first: its call starts a pass
    finished = [False]  # a pass began after the last one: the model is left alone from then on
    done: dict[str, int] = {}  # site name -> the pass it was last calibrated on (once per pass)

    def start_pass(args: tuple) -> None:
        """At the first site of a pass: count its samples; the pass that reaches ``samples`` is the last."""
        if report.complete:
            finished[0] = True
            return
        batch = args[0].shape[0] if args[0].dim() > 0 else 1
        count = torch.tensor([float(batch)], dtype=torch.float64, device=args[0].device)
        report.samples += int(reduce(count).item()) if reduce is not None else batch
        report.passes += 1
        report.complete = report.samples >= samples

    def calibrator(site: _Site) -> Callable:
        stats = report._sites[site.name] = _Statistics((state or {}).get("sites", {}).get(site.name))
        target = residual_scale if site.residual else 1.0

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if finished[0]:
                return
            if not args or not isinstance(args[0], Tensor):
                report.failed.setdefault(site.name, "its input is not a tensor")
                return
            if anchor[0] is None:
                anchor[0] = site.name
            if site.name == anchor[0]:
                start_pass(args)
                if finished[0]:
                    return
            if done.get(site.name) == report.passes or site.name in report.failed:
                return  # once per pass (a module called twice in a forward); a failed layer is left alone
            done[site.name] = report.passes
            if report.input_rms is None:
                report.input_rms = _rms(args[0])
            if target == 0.0:  # SkipInit: the branch starts at 0, once
                if site.name not in report.calibrated:
                    (_zero_gain if site.kind == "gain" else _zero_filters)(module)
                    _record(site)
                return
            why = _calibrate_site(site, stats, args, target, reduce, report.adjusted)
            if why is not None:
                report.failed[site.name] = why
            elif site.name not in report.calibrated:
                _record(site)

        return pre_hook

    def _record(site: _Site) -> None:
        report.calibrated.append(site.name)
        if site.residual:
            report.residual.append(site.name)

    try:
        for site in sites:
            if site.kind != "kept":
                handles.append(site.module.register_forward_pre_hook(calibrator(site)))
        with watch_signal(model, report, [s.name for s in sites]):
            yield report
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def watch_signal(
    model: nn.Module, report: Optional[CalibrationReport] = None, layers: Optional[Sequence[str]] = None
) -> Iterator[CalibrationReport]:
    """Record the RMS of the signal on the next forward pass: each layer's output and each ``Linear``'s input.

    A read-only check (nothing is changed): :meth:`CalibrationReport.signal_problem` then names the first layer
    where the signal vanishes or explodes.

    Args:
        model: the model to watch.
        report: a report to fill in (a new one by default).
        layers: names of the layers whose output is recorded (default: every gain layer and conv).

    Yields:
        The :class:`CalibrationReport` being filled in (``rms`` and ``input_rms``).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.calibration import watch_signal
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(576, 2))
        >>> with torch.no_grad(): _ = net[0].weight.mul_(1e-6)
        >>> with torch.no_grad(), watch_signal(net) as report:
        ...     _ = net(torch.randn(2, 1, 14, 14))
        >>> report.signal_problem()[0]
        '0'
    """
    report = CalibrationReport() if report is None else report
    if layers is None:
        layers = [n for n, m in model.named_modules() if gain_parameters(m) is not None or _is_conv(m)]
    wanted = set(layers)
    handles: list[RemovableHandle] = []

    def hook(name: str, head: bool) -> Callable:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if report.input_rms is None and args:
                report.input_rms = _rms(args[0])
            value = _rms(args[0] if head else output)
            if value is not None and name not in report.rms:
                report.rms[name] = value

        return record

    try:
        for name, module in model.named_modules():
            if name in wanted or isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(hook(name, isinstance(module, nn.Linear))))
        yield report
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _zero_gain(module: nn.Module) -> None:
    scale, _ = gain_parameters(module)  # type: ignore[misc]
    scale.zero_()


@torch.no_grad()
def _zero_filters(module: nn.Module) -> None:
    """Start a conv at output 0 (SkipInit): a folded conv through its scale and bias, any other through its
    filters."""
    folded = gain_parameters(module)
    if folded is None:
        module.weight.zero_()
        return
    for param in folded:
        if param is not None:
            param.zero_()
