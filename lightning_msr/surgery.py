"""Model surgery: take the BatchNorm out of a model so it trains without minibatch statistics.

Most convolutional networks (torchvision ResNets and MobileNets, most user models) are built with
BatchNorm. Mean Shift Rejection (arXiv:1911.13173) and Deep Control (arXiv:1706.03907) replace its
batch statistics; :func:`replace_batchnorm` swaps every BatchNorm for the layer that remains:

* ``"fold"`` -- BatchNorm's learnable per-channel scale and bias without the statistics (what MSR pairs
  with every zero-mean kernel), *folded into the conv that feeds it*: the conv becomes a
  :class:`~lightning_msr.nn.ScaledConv2d` (``scale[o] * conv(x, weight)[:, o] + bias[o]``) and the
  BatchNorm an ``nn.Identity``, so no activation-sized tensor is saved between the conv and the next layer;
* ``"affine"`` -- the same function as a separate layer, :class:`~lightning_msr.nn.affine.ChannelAffine`
  (it saves its input, the conv output, for backward, as much memory as BatchNorm);
* ``"agc_fold"`` / ``"agc"`` -- :class:`~lightning_msr.nn.AutomaticGainControl`, Deep Control's
  per-sample mean subtraction with a learnable gain; with ``"agc_fold"`` the gain goes into the conv's scale
  and the gain control keeps ``beta`` and ``bias`` (it then saves only the map means for backward);
* ``"identity"`` -- ``nn.Identity``, nothing at all.

Conv -> BatchNorm pairs are found in the model's ``torch.fx`` graph (see :func:`find_foldable_pairs`); a
BatchNorm that cannot be folded gets the unfolded layer (``"affine"`` or ``"agc"``). :func:`merge_scaled_convs`
multiplies the scales back into the weights for inference and export.

The function works on any ``nn.Module`` tree, in any training loop; the Lightning callbacks
(:class:`~lightning_msr.DeepControl`, ``MeanShiftRejection(batchnorm="replace")``) only decide *when* to
call it: in ``setup("fit")``, before the optimizer is built, before DDP wraps the model and before a
checkpoint is restored.

Example::

    >>> from torch import nn
    >>> from lightning_msr import replace_batchnorm
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> replaced = replace_batchnorm(net, "agc")
    >>> {name: type(old).__name__ for name, old in replaced.items()}
    {'1': 'BatchNorm2d'}
    >>> net[1]
    AutomaticGainControl(8, beta_init=1.0, gain_init=1.0, bias=True)
    >>> replace_batchnorm(net, "agc")  # nothing left to replace
    {}
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Literal, Optional

import torch
import torch.fx
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_msr._checks import (
    _check_beta_init,
    _check_bool,
    _check_choice,
    _check_names,
    _check_patterns_match,
    _shown,
)
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.nn.affine import ChannelAffine
from lightning_msr.nn.gain_control import AutomaticGainControl
from lightning_msr.nn.norm_act import NormAct, is_norm_act
from lightning_msr.nn.scaled_conv import is_scaled_conv, merge_scale_, scale_conv_

__all__ = ["Replacements", "find_batchnorm", "find_foldable_pairs", "merge_scaled_convs", "replace_batchnorm"]

Replacement = Literal["fold", "affine", "agc_fold", "agc", "identity"]
_REPLACEMENTS = ("fold", "affine", "agc_fold", "agc", "identity")
# What a BatchNorm that cannot be folded into its conv gets instead: the same function, unfolded.
_UNFOLDED = {"fold": "affine", "agc_fold": "agc"}
_FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The standard classes; other _BatchNorm subclasses are replaced only if they add no behaviour.
_STANDARD = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _wrapper_types() -> tuple[type, ...]:
    """Module classes whose internals (gradient reducers, shards) hold on to the parameters."""
    types: list[type] = [nn.DataParallel, nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - builds without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(types)


class Replacements(dict):
    """What :func:`replace_batchnorm` replaced: ``{qualified name: the old BatchNorm}``, in model order.

    It is a plain ``dict`` (empty when nothing was replaced), with two extra attributes:

    Attributes:
        module: the model after surgery. It is the module that was passed in, changed in place -- unless
            that module was itself a BatchNorm: a module cannot replace itself, so ``module`` is then the
            new layer (listed under the name ``""``) and the caller must use it.
        new_modules: ``{qualified name: the new layer}``, with the same keys (``nn.Identity`` for a BatchNorm
            folded into its conv).
        folded: ``{BatchNorm name: conv name}`` of the BatchNorm layers folded into the conv feeding them
            (``"fold"``/``"agc_fold"``); each such conv is now a :class:`~lightning_msr.nn.ScaledConv2d` (or
            1-D/3-D).

    A BatchNorm instance registered under several names (shared) is replaced by one shared new layer and
    listed under each name.

    Example::

        >>> from torch import nn
        >>> from lightning_msr import replace_batchnorm
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> result = replace_batchnorm(net)
        >>> list(result), result.module is net, result.new_modules["1"] is net[1]
        (['1'], True, True)
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.new_modules: dict[str, nn.Module] = {}
        self.folded: dict[str, str] = {}

    def __repr__(self) -> str:
        return dict.__repr__(self)


def _is_excluded(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _check_replaceable(name: str, module: _BatchNorm) -> None:
    shown = repr(name) if name else "the root module"
    if isinstance(module, LazyModuleMixin):
        raise MSRConfigurationError(
            f"Expected materialised BatchNorm layers, but {shown} is an uninitialised "
            f"{type(module).__name__}: its number of channels is not known yet. Run one forward pass (e.g. "
            "on a dummy batch) before replacing BatchNorm."
        )
    if type(module) in _STANDARD or is_norm_act(module):
        return
    standard_forward = any(type(module).forward is cls.forward for cls in _STANDARD)
    if not standard_forward or len(module._modules) > 0:
        raise MSRConfigurationError(
            f"Expected plain BatchNorm layers, but {shown} is a {type(module).__name__}, a BatchNorm subclass "
            "with its own forward or submodules, which a per-channel layer cannot stand in for (BatchNorm "
            "subclasses whose only submodules are `drop` and `act`, like timm's BatchNormAct2d, are replaced "
            "with their drop path and activation kept). Replace it yourself, or leave it out with `exclude=`."
        )


def _new_layer(batchnorm: _BatchNorm, replacement: str, beta_init: float, fold_running_stats: bool) -> nn.Module:
    if replacement == "affine":
        return ChannelAffine.from_batchnorm(batchnorm, fold_running_stats=fold_running_stats)
    if replacement == "agc":
        return AutomaticGainControl.from_batchnorm(batchnorm, beta_init=beta_init)
    return nn.Identity().train(batchnorm.training)


def _fold_into_conv(
    conv: nn.Module, batchnorm: _BatchNorm, replacement: str, beta_init: float, fold_running_stats: bool
) -> nn.Module:
    """Make ``conv`` a scaled conv carrying BatchNorm's scale (and shift); return what takes the BatchNorm's place.

    ``"fold"``: ``scale * conv(x) + bias`` is BatchNorm's affine part (the conv's own bias ``c`` becomes
    ``scale * c + bias``), and the BatchNorm becomes ``nn.Identity``. ``"agc_fold"``: the scale is the gain of
    ``gain * (x - beta * mean(x)) + bias``, which is linear in ``x``, so ``gain * x`` is computed by the conv
    and the BatchNorm becomes a gain control without a gain (``beta`` and ``bias`` only).
    """
    affine = ChannelAffine.from_batchnorm(batchnorm, fold_running_stats=fold_running_stats)
    scale, shift = affine.weight, affine.bias
    with torch.no_grad():
        conv_bias = None if conv.bias is None else conv.bias * scale
    if replacement == "fold":
        bias = shift if conv_bias is None else conv_bias + shift
        scale_conv_(conv, scale, bias)
        return nn.Identity().train(batchnorm.training)
    scale_conv_(conv, scale, conv_bias)
    return AutomaticGainControl.from_batchnorm(batchnorm, beta_init=beta_init, gain=False)


class _ConvBatchNormTracer(torch.fx.Tracer):
    """Keeps every conv and BatchNorm (user subclasses too) a leaf, so that each call is one graph node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.modules.conv._ConvNd, _BatchNorm)) or super().is_leaf_module(
            m, module_qualified_name
        )


def _traced_graphs(module: nn.Module, prefix: str = "") -> list[tuple[str, torch.fx.Graph]]:
    """``torch.fx`` graphs of ``module``, or of its largest traceable submodules when it does not trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [(prefix, _ConvBatchNormTracer().trace(module))]
    except Exception:  # control flow on tensors, unsupported ops, no forward (a LightningModule)...
        graphs = []
        for name, child in module.named_children():
            graphs += _traced_graphs(child, f"{prefix}{name}.")
        return graphs


def _module_at(module: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def find_foldable_pairs(module: nn.Module, exclude: Optional[Sequence[str]] = None) -> dict[str, str]:
    """The BatchNorm layers whose scale can move into the conv that feeds them: ``{BatchNorm name: conv name}``.

    The pairs are read from the model's ``torch.fx`` graph, as PyTorch's own conv-BatchNorm fusion for
    inference does (``torch.fx.experimental.optimization.fuse``). A model that does not trace (control flow on
    tensor values, a LightningModule without ``forward``) is searched in its largest submodules that do, so
    pairs inside them are still found. A pair qualifies only when all of this holds:

    * the BatchNorm is called on the output of a plain ``nn.Conv1d/2d/3d`` (exactly: a subclass such as timm's
      ``StdConv2d`` computes its weight differently) and on nothing else;
    * that conv output feeds nothing but the BatchNorm (no residual branch, no second consumer);
    * the conv and the BatchNorm are each called once, registered under one name, and the graph does not read
      their parameters directly; the conv has as many output channels as the BatchNorm has features.

    One case no graph can rule out: the ``forward`` of a module that does *not* trace calling a conv of a
    traced submodule directly. Leave such layers out with ``exclude``.

    Args:
        module: the model to search (not changed).
        exclude: module-name patterns (``fnmatch`` syntax) of BatchNorm layers to leave out.

    Returns:
        ``{BatchNorm qualified name: conv qualified name}``, in graph order.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr.surgery import find_foldable_pairs
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        ...         self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        ...     def forward(self, x):
        ...         y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        ...         return self.bn2(y) + y  # conv2's output also feeds the sum: not foldable
        >>> find_foldable_pairs(Block())
        {'bn1': 'conv1'}
    """
    patterns = _check_names("exclude", exclude)
    registered: dict[int, int] = {}
    for _, child in module.named_modules(remove_duplicate=False):
        registered[id(child)] = registered.get(id(child), 0) + 1
    calls: dict[int, int] = {}
    read_directly: set[int] = set()
    candidates: list[tuple[str, nn.Module, str, nn.Module]] = []
    for prefix, graph in _traced_graphs(module):
        for node in graph.nodes:
            if node.op == "get_attr":
                owner = _module_at(module, (prefix + str(node.target)).rpartition(".")[0])
                if owner is not None:
                    read_directly.add(id(owner))
                continue
            if node.op != "call_module":
                continue
            layer = _module_at(module, prefix + str(node.target))
            if layer is None:
                continue
            calls[id(layer)] = calls.get(id(layer), 0) + 1
            if not isinstance(layer, _BatchNorm) or len(node.args) != 1 or node.kwargs:
                continue
            source = node.args[0]
            if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
                continue
            conv = _module_at(module, prefix + str(source.target))
            if conv is not None and type(conv) in _FOLDABLE_CONVS:
                candidates.append((prefix + str(node.target), layer, prefix + str(source.target), conv))
    pairs: dict[str, str] = {}
    for bn_name, batchnorm, conv_name, conv in candidates:
        single = all(calls.get(id(m)) == 1 and registered.get(id(m)) == 1 for m in (batchnorm, conv))
        if (
            single
            and not read_directly & {id(batchnorm), id(conv)}
            and conv.out_channels == batchnorm.num_features
            and not _is_excluded(bn_name, patterns)
        ):
            pairs[bn_name] = conv_name
    return pairs


def merge_scaled_convs(module: nn.Module) -> list[str]:
    """Multiply every scaled conv's ``scale`` into its weight: plain convs for inference and export, in place.

    Every :class:`~lightning_msr.nn.ScaledConv2d` (and 1-D/3-D) in ``module`` -- e.g. made by
    ``replace_batchnorm(model, "fold")`` -- becomes the plain ``nn.Conv2d`` computing the same function,
    ``weight = scale * weight`` (``bias`` kept; see :func:`~lightning_msr.nn.scaled_conv.merge_scale_`). The
    modules stay the same objects. Do it after training (and after loading the trained checkpoint): the merged
    model has no ``scale`` parameters, so Mean Shift Rejection would then centre ``scale * weight``. Calling
    it again finds nothing to merge.

    Args:
        module: the model, changed in place (the root itself may be a scaled conv).

    Returns:
        The qualified names of the merged convs.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr import merge_scaled_convs, replace_batchnorm
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> _ = replace_batchnorm(net, "fold")
        >>> type(net[0]).__name__
        'ScaledConv2d'
        >>> x = torch.randn(2, 3, 8, 8)
        >>> before = net(x)
        >>> merge_scaled_convs(net)
        ['0']
        >>> type(net[0]).__name__, torch.allclose(net(x), before, atol=1e-6)
        ('Conv2d', True)
    """
    if not isinstance(module, nn.Module):
        raise MSRConfigurationError(f"Expected `module` to be a torch.nn.Module, but got {type(module).__name__}.")
    merged = [name for name, child in module.named_modules() if is_scaled_conv(child)]
    for name in merged:
        merge_scale_(module.get_submodule(name))
    return merged


def find_batchnorm(module: nn.Module, exclude: Optional[Sequence[str]] = None) -> dict[str, nn.Module]:
    """Every BatchNorm (any ``torch.nn.modules.batchnorm._BatchNorm``) in ``module``, by qualified name.

    Args:
        module: the model to search (the root itself included, under the name ``""``).
        exclude: module-name patterns (``fnmatch`` syntax) to leave out.

    Example::

        >>> from torch import nn
        >>> from lightning_msr.surgery import find_batchnorm
        >>> list(find_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
        ['1']
    """
    patterns = _check_names("exclude", exclude)
    return {
        name: child
        for name, child in module.named_modules(remove_duplicate=False)
        if isinstance(child, _BatchNorm) and not _is_excluded(name, patterns)
    }


def _check_not_stepped(optimizers: Sequence[torch.optim.Optimizer], found: dict[str, nn.Module]) -> None:
    for index, optimizer in enumerate(optimizers):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise MSRConfigurationError(
                f"Expected `optimizers` to hold torch.optim.Optimizer objects, but got {type(optimizer).__name__} at "
                f"index {index}."
            )
        for name, batchnorm in found.items():
            if any(optimizer.state.get(p) for p in batchnorm.parameters(recurse=False)):
                raise MSRConfigurationError(
                    f"Expected optimizers that have not stepped yet, but optimizer {index} "
                    f"({type(optimizer).__name__}) holds state for the BatchNorm {name!r}, which the surgery "
                    "would lose. Replace BatchNorm before training, e.g. right after building the model and "
                    "the optimizer."
                )


_SCALE_LIKE = ("scale", "weight", "gain", "beta")


def _swap_parameters(
    optimizers: Sequence[torch.optim.Optimizer],
    result: Replacements,
    convs: dict[str, nn.Module],
    old_conv_bias: dict[str, Optional[nn.Parameter]],
) -> None:
    """Put the parameters the surgery created where the ones it removed were in every optimizer's param groups.

    Each new parameter takes the place of the BatchNorm parameter it comes from (scale-like ones the
    ``weight``'s, the ``bias`` the ``bias``'s); where that is not in the group (``affine=False``), it goes next to
    the conv feeding the BatchNorm, else into the first group."""
    replaces: dict[int, list[nn.Parameter]] = {}  # old parameter -> the new ones in its place
    dropped: set[int] = set()
    homeless: list[tuple[nn.Parameter, list[Optional[nn.Parameter]]]] = []  # new parameter, where it may go
    done: set[int] = set()
    for name, batchnorm in result.items():
        new = result.new_modules[name]
        if id(new) in done:
            continue  # a shared BatchNorm, listed under several names
        done.add(id(new))
        fresh = [(leaf.rpartition(".")[2], p) for leaf, p in new.named_parameters()]
        conv = convs.get(name)
        if conv is not None:
            fresh += [(leaf, p) for leaf, p in conv.named_parameters(recurse=False) if leaf != "weight"]
            old_bias = old_conv_bias.get(name)
            if old_bias is not None:
                dropped.add(id(old_bias))
        for leaf, param in fresh:
            source = batchnorm._parameters.get("bias" if leaf == "bias" else "weight")
            others = [conv.weight if conv is not None else None]
            if source is None:
                homeless.append((param, others))
            else:
                replaces.setdefault(id(source), []).append(param)
    model_params = {id(p) for p in result.module.parameters()} | set(replaces) | dropped
    for optimizer in optimizers:
        if not any(id(p) in model_params for g in optimizer.param_groups for p in g["params"]):
            continue  # an optimizer of another model
        placed: set[int] = set()
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if id(p) in replaces:
                    params += replaces[id(p)]
                    placed.update(id(q) for q in replaces[id(p)])
                elif id(p) not in dropped:
                    params.append(p)
            group["params"] = params
        for param, near in homeless:
            target = next(
                (g for g in optimizer.param_groups if any(any(q is n for n in near) for q in g["params"])),
                optimizer.param_groups[0],
            )
            if id(param) not in placed:
                target["params"].append(param)


def replace_batchnorm(
    module: nn.Module,
    replacement: Replacement = "affine",
    *,
    beta_init: float = 1.0,
    fold_running_stats: bool = False,
    exclude: Optional[Sequence[str]] = None,
    optimizers: Optional[Sequence[torch.optim.Optimizer]] = None,
) -> Replacements:
    """Replace every BatchNorm in ``module`` (in place) with a layer that uses no batch statistics.

    ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses that add no behaviour are replaced anywhere in
    the tree, root included. The new layer:

    * ``"fold"``: BatchNorm's ``weight``/``bias`` become the ``scale``/``bias`` of the conv that feeds it,
      which turns into a :class:`~lightning_msr.nn.ScaledConv2d` (or 1-D/3-D) computing
      ``scale[o] * conv(x, weight)[:, o] + bias[o]`` (a conv bias ``c`` of its own becomes
      ``scale * c + bias``), and the BatchNorm becomes ``nn.Identity()``. The same function as ``"affine"``,
      without the conv output that a separate scale layer keeps for backward: a conv -> BatchNorm -> ReLU
      stack then saves about as much for backward as conv -> ReLU. Which pairs fold is decided from the
      model's ``torch.fx`` graph (:func:`find_foldable_pairs`); every other BatchNorm gets the ``"affine"``
      layer, and a message names them;
    * ``"affine"``: :class:`~lightning_msr.nn.affine.ChannelAffine` with BatchNorm's ``weight``/``bias``;
    * ``"agc_fold"``: Deep Control with the gain folded: the feeding conv becomes a scaled conv whose
      ``scale`` is the gain (from BatchNorm's ``weight``; a conv bias ``c`` becomes ``scale * c``), followed
      by an :class:`~lightning_msr.nn.AutomaticGainControl` without gain (``gain=False``; ``beta = beta_init``,
      ``bias`` from BatchNorm's). Together they compute
      ``scale * (conv(x) - beta * mean_spatial(conv(x))) + bias``, what ``"agc"`` computes, and the gain
      control saves only the map means for backward. BatchNorm layers that do not fold get ``"agc"``;
    * ``"agc"``: :class:`~lightning_msr.nn.AutomaticGainControl` with ``gain``/``bias`` from BatchNorm's
      ``weight``/``bias`` and ``beta = beta_init``;
    * ``"identity"``: ``nn.Identity()``.

    So a freshly built model computes, up to BatchNorm's ``eps`` and rounding, what it computed in evaluation
    mode before (``"affine"``, ``"fold"``). A BatchNorm with ``affine=False`` gives scale 1 and bias 0,
    learnable (see :meth:`ChannelAffine.from_batchnorm <lightning_msr.nn.affine.ChannelAffine.from_batchnorm>`).
    The new layers are on the BatchNorm's device, in its dtype and training mode; ``requires_grad`` of the
    affine parameters is kept. A folded conv stays the same module object with the same ``weight`` (its
    hooks are kept: a forward hook on it now sees the scaled and shifted output). Running statistics are
    dropped (or folded in, see ``fold_running_stats``), and hooks registered on the old BatchNorm are not
    carried over.

    Calling it again finds nothing to replace and returns an empty result, so it is harmless to apply
    twice. An optimizer built before the surgery holds the old parameters: pass it in ``optimizers`` and the
    new parameters take the old ones' places in its param groups (or build it after the surgery). Wrap the
    model in DDP after the surgery too: a wrapped model is refused. :func:`merge_scaled_convs` turns the scaled convs
    into plain ones for inference.

    Args:
        module: the model, changed in place.
        replacement: ``"fold"``, ``"affine"``, ``"agc_fold"``, ``"agc"`` or ``"identity"``.
        beta_init: initial ``beta`` of the ``"agc"``/``"agc_fold"`` layers, in ``[0, 1]``.
        fold_running_stats: ``"affine"``/``"fold"`` only: fold each BatchNorm's running statistics into the
            new scale and bias, so the converted model computes what the BatchNorm model computes in
            evaluation mode. Use it to convert a *trained* model (e.g. pretrained weights) for fine-tuning.
        exclude: module-name patterns (``fnmatch`` syntax, e.g. ``"head.*"``) of BatchNorm layers to keep.
            Every pattern must match a module of ``module``.
        optimizers: optimizers built on ``module`` before the surgery, updated in place: in every param group,
            a BatchNorm's ``weight`` is replaced by the new layer's scale-like parameters (``scale``, ``weight``,
            ``gain``, ``beta``) and its ``bias`` by the new ``bias``, so they keep that group's learning rate and
            weight decay; a folded conv's own old ``bias`` is dropped (the new ``bias`` replaces it). They must
            not have stepped yet (their state for the old parameters would be lost).

    Returns:
        A :class:`Replacements`: ``{qualified name: old BatchNorm}``, with ``.module`` (the model after
        surgery; a new object only when ``module`` itself was a BatchNorm), ``.new_modules`` and ``.folded``.

    Raises:
        MSRConfigurationError: on an unknown ``replacement`` or invalid option (``beta_init`` outside
            ``[0, 1]``, an ``exclude`` pattern that matches no module); if the model is, or contains,
            a ``DistributedDataParallel``/``DataParallel``/FSDP wrapper; for an uninitialised lazy BatchNorm;
            for a BatchNorm subclass with its own ``forward`` or submodules (use ``exclude``); for an optimizer
            in ``optimizers`` that has already stepped the BatchNorm's parameters.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_msr import replace_batchnorm
        >>> net = nn.Sequential(
        ...     nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...     nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)),
        ... )
        >>> replaced = replace_batchnorm(net, "affine")
        >>> list(replaced)
        ['1', '3.1']
        >>> net(torch.randn(1, 3, 16, 16)).shape  # batch size 1 works in training mode
        torch.Size([1, 8, 12, 12])
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> replace_batchnorm(net, "fold").folded
        {'1': '0'}
        >>> net
        Sequential(
          (0): ScaledConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
          (2): ReLU()
        )
    """
    _check_choice("replacement", replacement, _REPLACEMENTS)
    beta_init = _check_beta_init(beta_init)
    _check_bool("fold_running_stats", fold_running_stats)
    if fold_running_stats and replacement not in ("affine", "fold"):
        raise MSRConfigurationError(
            f"Expected `fold_running_stats=True` only with replacement='affine' or 'fold', but got {replacement!r}: "
            "only a plain per-channel scale and bias can reproduce BatchNorm's evaluation output."
        )
    patterns = _check_names("exclude", exclude)
    if not isinstance(module, nn.Module):
        raise MSRConfigurationError(f"Expected `module` to be a torch.nn.Module, but got {type(module).__name__}.")
    wrappers = _wrapper_types()
    for name, child in module.named_modules():
        if isinstance(child, wrappers):
            where = "`module` is" if not name else f"`module` contains ({name!r})"
            raise MSRConfigurationError(
                f"Expected an unwrapped model, but {where} a {type(child).__name__}: its gradient reducer (or "
                "shards) already hold the BatchNorm parameters. Replace BatchNorm before wrapping, e.g. "
                "`replace_batchnorm(model)` then `DistributedDataParallel(model)`; with Lightning, use the "
                "`DeepControl` or `MeanShiftRejection(batchnorm='replace')` callback, which runs before DDP."
            )

    _check_patterns_match("exclude", patterns, module)
    result = Replacements(module)
    found = find_batchnorm(module, patterns)
    if not found:
        return result
    for name, batchnorm in found.items():
        _check_replaceable(name, batchnorm)
    optimizers = list(optimizers or [])
    _check_not_stepped(optimizers, found)
    pairs = find_foldable_pairs(module, patterns) if replacement in _UNFOLDED else {}
    # Resolve the convs before any surgery changes the tree.
    convs = {bn_name: module.get_submodule(conv_name) for bn_name, conv_name in pairs.items()}
    old_conv_bias = {name: conv._parameters.get("bias") for name, conv in convs.items()}

    new_by_id: dict[int, nn.Module] = {}
    for name, batchnorm in found.items():
        if id(batchnorm) not in new_by_id:
            if name in convs:
                new = _fold_into_conv(convs[name], batchnorm, replacement, beta_init, fold_running_stats)
                result.folded[name] = pairs[name]
            else:
                kind = _UNFOLDED.get(replacement, replacement)
                new = _new_layer(batchnorm, kind, beta_init, fold_running_stats)
            if is_norm_act(batchnorm):  # timm's BatchNormAct2d: only the statistics go, drop path and activation stay
                new = NormAct(new, batchnorm.drop, batchnorm.act).train(batchnorm.training)
            new_by_id[id(batchnorm)] = new
        new = new_by_id[id(batchnorm)]
        result[name] = batchnorm
        result.new_modules[name] = new
        if name:
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attribute, new)
        else:
            result.module = new

    if optimizers:
        _swap_parameters(optimizers, result, convs, old_conv_bias)
    count = len(new_by_id)
    plural = "s" if count != 1 else ""
    if replacement in _UNFOLDED:
        unfolded = [name for name in result if name not in result.folded]
        layer = "ChannelAffine" if replacement == "fold" else "AutomaticGainControl"
        gain = "scale" if replacement == "fold" else "gain"
        rank_zero_info(
            f"lightning_msr: replaced {count} BatchNorm layer{plural} ({replacement!r}): folded the {gain} of "
            f"{len(result.folded)} into the conv feeding them"
            + (
                f"; {len(unfolded)} ({_shown(unfolded)}) got a separate {layer}, as their input is not the "
                "output of a plain conv that feeds nothing else (or the model does not trace there)."
                if unfolded
                else "."
            )
        )
    else:
        new_type = type(next(iter(result.new_modules.values()))).__name__
        rank_zero_info(f"lightning_msr: replaced {count} BatchNorm layer{plural} with {new_type} ({replacement!r}).")
    if "" in result:
        rank_zero_warn(
            "The root module is itself a BatchNorm; a module cannot replace itself, so it is left unchanged. "
            "Use the returned `.module` (the new layer) instead.",
            category=MSRWarning,
            stacklevel=5,  # the caller of replace_batchnorm
        )
    return result
