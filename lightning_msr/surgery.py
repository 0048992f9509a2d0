"""Model surgery: take the BatchNorm out of a model so it trains without minibatch statistics.

Most convolutional networks (torchvision ResNets and MobileNets, most user models) are built with
BatchNorm. Mean Shift Rejection (arXiv:1911.13173) and Deep Control (arXiv:1706.03907) replace its
batch statistics; :func:`replace_batchnorm` swaps every BatchNorm for the layer that remains:

* ``"affine"`` -- :class:`~lightning_msr.nn.affine.ChannelAffine`, BatchNorm's learnable per-channel
  scale and bias without the statistics (what MSR pairs with every zero-mean kernel);
* ``"agc"`` -- :class:`~lightning_msr.nn.AutomaticGainControl`, Deep Control's per-sample mean
  subtraction with a learnable gain;
* ``"identity"`` -- ``nn.Identity``, nothing at all.

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

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Literal, Optional

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from lightning_msr._checks import _check_beta_init, _check_bool, _check_choice, _check_names, _check_patterns_match
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.nn.affine import ChannelAffine
from lightning_msr.nn.gain_control import AutomaticGainControl

__all__ = ["Replacements", "find_batchnorm", "replace_batchnorm"]

Replacement = Literal["affine", "agc", "identity"]
_REPLACEMENTS = ("affine", "agc", "identity")
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
        new_modules: ``{qualified name: the new layer}``, with the same keys.

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
    if type(module) in _STANDARD:
        return
    standard_forward = any(type(module).forward is cls.forward for cls in _STANDARD)
    if not standard_forward or len(module._modules) > 0:
        raise MSRConfigurationError(
            f"Expected plain BatchNorm layers, but {shown} is a {type(module).__name__}, a BatchNorm subclass "
            "with its own forward or submodules (e.g. timm's BatchNormAct2d fuses an activation), which a "
            "per-channel layer cannot stand in for. Replace it yourself, or leave it out with `exclude=`."
        )


def _new_layer(batchnorm: _BatchNorm, replacement: str, beta_init: float, fold_running_stats: bool) -> nn.Module:
    if replacement == "affine":
        return ChannelAffine.from_batchnorm(batchnorm, fold_running_stats=fold_running_stats)
    if replacement == "agc":
        return AutomaticGainControl.from_batchnorm(batchnorm, beta_init=beta_init)
    return nn.Identity().train(batchnorm.training)


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


def _shown(names: Sequence[str], limit: int = 5) -> str:
    """``'a', 'b', ...``: the first ``limit`` module names for an error or warning (the root shown as <root>)."""
    return ", ".join(repr(n or "<root>") for n in names[:limit]) + (", ..." if len(names) > limit else "")


def replace_batchnorm(
    module: nn.Module,
    replacement: Replacement = "affine",
    *,
    beta_init: float = 1.0,
    fold_running_stats: bool = False,
    exclude: Optional[Sequence[str]] = None,
) -> Replacements:
    """Replace every BatchNorm in ``module`` (in place) with a layer that uses no batch statistics.

    ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses that add no behaviour are replaced anywhere in
    the tree, root included. The new layer:

    * ``"affine"``: :class:`~lightning_msr.nn.affine.ChannelAffine` with BatchNorm's ``weight``/``bias``;
    * ``"agc"``: :class:`~lightning_msr.nn.AutomaticGainControl` with ``gain``/``bias`` from BatchNorm's
      ``weight``/``bias`` and ``beta = beta_init``;
    * ``"identity"``: ``nn.Identity()``.

    So a freshly built model computes, up to BatchNorm's ``eps``, what it computed in evaluation mode
    before (``"affine"``). A BatchNorm with ``affine=False`` gives scale 1 and bias 0, learnable (see
    :meth:`ChannelAffine.from_batchnorm <lightning_msr.nn.affine.ChannelAffine.from_batchnorm>`). The new
    layers are on the BatchNorm's device, in its dtype and training mode; ``requires_grad`` of the affine
    parameters is kept. Running statistics are dropped (or folded in, see ``fold_running_stats``), and
    hooks registered on the old BatchNorm are not carried over.

    Calling it again finds nothing to replace and returns an empty result, so it is harmless to apply
    twice. Build the optimizer *after* the surgery (it holds the old parameters otherwise), and wrap the
    model in DDP after it too: a wrapped model is refused.

    Args:
        module: the model, changed in place.
        replacement: ``"affine"``, ``"agc"`` or ``"identity"``.
        beta_init: initial ``beta`` of the ``"agc"`` layers, in ``[0, 1]``.
        fold_running_stats: ``"affine"`` only: fold each BatchNorm's running statistics into the new scale
            and bias, so the converted model computes what the BatchNorm model computes in evaluation
            mode. Use it to convert a *trained* model (e.g. pretrained weights) for fine-tuning.
        exclude: module-name patterns (``fnmatch`` syntax, e.g. ``"head.*"``) of BatchNorm layers to keep.
            Every pattern must match a module of ``module``.

    Returns:
        A :class:`Replacements`: ``{qualified name: old BatchNorm}``, with ``.module`` (the model after
        surgery; a new object only when ``module`` itself was a BatchNorm) and ``.new_modules``.

    Raises:
        MSRConfigurationError: on an unknown ``replacement`` or invalid option (``beta_init`` outside
            ``[0, 1]``, an ``exclude`` pattern that matches no module); if the model is, or contains,
            a ``DistributedDataParallel``/``DataParallel``/FSDP wrapper; for an uninitialised lazy BatchNorm;
            for a BatchNorm subclass with its own ``forward`` or submodules (use ``exclude``).

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
    """
    _check_choice("replacement", replacement, _REPLACEMENTS)
    beta_init = _check_beta_init(beta_init)
    _check_bool("fold_running_stats", fold_running_stats)
    if fold_running_stats and replacement != "affine":
        raise MSRConfigurationError(
            f"Expected `fold_running_stats=True` only with replacement='affine', but got {replacement!r}: "
            "only a plain per-channel affine layer can reproduce BatchNorm's evaluation output."
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

    new_by_id: dict[int, nn.Module] = {}
    for name, batchnorm in found.items():
        if id(batchnorm) not in new_by_id:
            new_by_id[id(batchnorm)] = _new_layer(batchnorm, replacement, beta_init, fold_running_stats)
        new = new_by_id[id(batchnorm)]
        result[name] = batchnorm
        result.new_modules[name] = new
        if name:
            parent_name, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attribute, new)
        else:
            result.module = new

    new_type = type(next(iter(result.new_modules.values()))).__name__
    count = len(new_by_id)
    rank_zero_info(
        f"lightning_msr: replaced {count} BatchNorm layer{'s' if count != 1 else ''} with {new_type}"
        f" ({replacement!r})."
    )
    if "" in result:
        rank_zero_warn(
            "The root module is itself a BatchNorm; a module cannot replace itself, so it is left unchanged. "
            "Use the returned `.module` (the new layer) instead.",
            category=MSRWarning,
            stacklevel=5,  # the caller of replace_batchnorm
        )
    return result
