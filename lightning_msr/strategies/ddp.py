"""Data-parallel training for Mean Shift Rejection models: no BatchNorm sync, no per-step buffer broadcast.

A network trained with Mean Shift Rejection (Ruff, Beck, Bach, arXiv:1911.13173) or Deep Control (Ruff,
arXiv:1706.03907) has no minibatch statistics: the train graph is the test graph and every rank computes
its forward pass from its own samples alone. Under data parallelism that removes two costs of plain DDP:

* ``SyncBatchNorm`` -- a blocking collective per BatchNorm layer in every forward and every backward pass;
* DDP's default ``broadcast_buffers=True`` -- a broadcast of every buffer (BatchNorm running statistics)
  from rank 0 before every forward pass.

:class:`MSRDDPStrategy` is Lightning's :class:`~lightning.pytorch.strategies.DDPStrategy` with buffers
broadcast only once, when DDP wraps the model, and with both ways back to batch statistics closed: it
refuses ``Trainer(sync_batchnorm=True)`` and a model that still contains BatchNorm when training starts.
Importing :mod:`lightning_msr` registers it as ``"ddp_msr"`` (processes started with ``popen``, like
``"ddp"``) and ``"ddp_msr_spawn"`` (``spawn``, like ``"ddp_spawn"``).
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any, Callable, Literal, Optional

import lightning.pytorch as pl
import torch
import torch.distributed
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_msr._checks import _check_bool, _shown
from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.surgery import find_batchnorm

__all__ = ["MSRDDPStrategy"]

# torch >= 2.13 splits DDP's `broadcast_buffers` into `forward_sync_buffers` (the per-forward broadcast) and an
# initial sync that always includes the buffers. Older torch skips the buffers in the initial sync as well when
# `broadcast_buffers=False`, so the strategy broadcasts them once itself.
_DDP_HAS_FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
_REGISTERED_NAMES = (("ddp_msr", "popen"), ("ddp_msr_spawn", "spawn"))

_SYNC_BATCHNORM_MESSAGE = (
    "MSRDDPStrategy ('ddp_msr') refuses `Trainer(sync_batchnorm=True)` (and any `LayerSync` plugin): it would turn "
    "every BatchNorm into SyncBatchNorm, which synchronises the batch statistics of every layer across all ranks "
    "in every forward and backward pass -- exactly the cost this strategy exists to avoid. A model trained with "
    "Mean Shift Rejection or Deep Control has no batch statistics to synchronise. Remove `sync_batchnorm=True` "
    "and let `MeanShiftRejection(batchnorm='replace')` or `DeepControl()` take the BatchNorm layers out; or, to "
    "keep synchronised BatchNorm, use `strategy='ddp'`."
)


class MSRDDPStrategy(DDPStrategy):
    """DDP for networks without BatchNorm: no SyncBatchNorm and no buffer broadcast before each forward pass.

    Everything :class:`~lightning.pytorch.strategies.DDPStrategy` does, it does -- one process per device, any
    number of nodes, gradients averaged by :class:`~torch.nn.parallel.DistributedDataParallel` -- with three
    differences that suit Mean Shift Rejection (and Deep Control) models, whose forward pass uses no minibatch
    statistics:

    * ``broadcast_buffers`` defaults to ``False``: buffers are broadcast from rank 0 once, when DDP wraps the
      model (so every rank starts from identical parameters *and* buffers), instead of before every forward
      pass. The only collective per training step is then DDP's gradient all-reduce;
    * ``Trainer(sync_batchnorm=True)`` is refused when the Trainer is built, before any process is launched;
    * a model that still contains BatchNorm (any ``torch.nn.modules.batchnorm._BatchNorm``, ``SyncBatchNorm``
      included) when fitting starts is refused. ``MeanShiftRejection(batchnorm="replace")`` and
      ``DeepControl()`` replace BatchNorm in their ``setup`` hook, which Lightning runs before this check.
      Validation, test and predict runs are not checked: an evaluating BatchNorm uses its running statistics,
      which the strategy broadcasts from rank 0 as :class:`~lightning.pytorch.strategies.DDPStrategy` does.

    Importing :mod:`lightning_msr` registers the strategy as ``"ddp_msr"`` (processes started like ``"ddp"``)
    and ``"ddp_msr_spawn"`` (like ``"ddp_spawn"``), so ``Trainer(strategy="ddp_msr")`` and the LightningCLI flag
    ``--trainer.strategy=ddp_msr`` select it.

    Args:
        accelerator: passed to :class:`~lightning.pytorch.strategies.DDPStrategy`, as are all arguments up to
            ``start_method``.
        parallel_devices: the devices of this node (set by the Trainer).
        cluster_environment: the cluster environment (set by the Trainer: SLURM, torchelastic, ...).
        checkpoint_io: the checkpoint IO plugin.
        precision_plugin: the precision plugin.
        ddp_comm_state: state of a DDP communication hook.
        ddp_comm_hook: a DDP communication hook (e.g. PowerSGD; CUDA only, as in Lightning).
        ddp_comm_wrapper: a wrapper of the communication hook (e.g. fp16 compression).
        model_averaging_period: period of post-local SGD model averaging.
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; by default the one that suits the device.
        timeout: timeout of the process-group operations.
        start_method: how processes are started: ``"popen"`` (re-runs the script), ``"spawn"``, ``"fork"``
            or ``"forkserver"``.
        broadcast_buffers: broadcast every buffer from rank 0 before every forward pass, as plain DDP does by
            default. ``False`` (the default) broadcasts the buffers once, when DDP wraps the model.
        **kwargs: passed on to :class:`~torch.nn.parallel.DistributedDataParallel` (``find_unused_parameters``,
            ``static_graph``, ``gradient_as_bucket_view``, ``bucket_cap_mb``, ...). ``forward_sync_buffers``,
            torch 2.13's new name for ``broadcast_buffers``, is accepted in its place.

    Raises:
        MSRConfigurationError: when ``broadcast_buffers`` is not a bool or contradicts ``forward_sync_buffers``;
            when a Trainer gives the strategy a ``LayerSync`` plugin (``Trainer(sync_batchnorm=True)``); at the
            start of fitting, when the model still contains BatchNorm layers.

    Example::

        >>> import lightning as L
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> from lightning_msr import MSRDDPStrategy
        >>> StrategyRegistry["ddp_msr"]["strategy"] is MSRDDPStrategy
        True
        >>> StrategyRegistry["ddp_msr_spawn"]["init_params"]
        {'start_method': 'spawn'}
        >>> MSRDDPStrategy(static_graph=True).broadcast_buffers
        False
        >>> trainer = L.Trainer(strategy="ddp_msr", accelerator="cpu", devices=2, logger=False,
        ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> type(trainer.strategy).__name__, trainer.world_size
        ('MSRDDPStrategy', 2)
        >>> L.Trainer(strategy="ddp_msr", accelerator="cpu", devices=2, sync_batchnorm=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_msr.exceptions.MSRConfigurationError: MSRDDPStrategy ('ddp_msr') refuses ...
    """

    def __init__(
        self,
        accelerator: Optional[pl.accelerators.Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        ddp_comm_state: Optional[object] = None,
        ddp_comm_hook: Optional[Callable] = None,
        ddp_comm_wrapper: Optional[Callable] = None,
        model_averaging_period: Optional[int] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        broadcast_buffers: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_bool("broadcast_buffers", broadcast_buffers)
        # `None` is DistributedDataParallel's "not given" (LightningCLI passes every resolved default explicitly)
        forward_sync = kwargs.pop("forward_sync_buffers", None)
        if forward_sync is not None:
            _check_bool("forward_sync_buffers", forward_sync)
            if broadcast_buffers and not forward_sync:
                raise MSRConfigurationError(
                    "Expected one of `broadcast_buffers` and `forward_sync_buffers`, but got broadcast_buffers=True "
                    "and forward_sync_buffers=False. `forward_sync_buffers` is the name torch >= 2.13 gives "
                    "`broadcast_buffers`; pass only one of them."
                )
            broadcast_buffers = forward_sync
        if _DDP_HAS_FORWARD_SYNC_BUFFERS:
            # same meaning, without torch's deprecation warning; the initial sync keeps the buffers
            kwargs["forward_sync_buffers"] = broadcast_buffers
        else:
            kwargs["broadcast_buffers"] = broadcast_buffers
        self._broadcast_buffers = broadcast_buffers
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            ddp_comm_state=ddp_comm_state,
            ddp_comm_hook=ddp_comm_hook,
            ddp_comm_wrapper=ddp_comm_wrapper,
            model_averaging_period=model_averaging_period,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )

    @property
    def broadcast_buffers(self) -> bool:
        """Whether DDP broadcasts the buffers from rank 0 before every forward pass (``False`` by default)."""
        return self._broadcast_buffers

    # Lightning hands the `LayerSync` plugin of `Trainer(sync_batchnorm=True)` to the strategy by setting this
    # attribute while the Trainer is built; refusing here fails before any process is launched and long before
    # the strategy's `setup` would convert the model.
    @property  # type: ignore[override]
    def _layer_sync(self) -> Optional[LayerSync]:
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: Optional[LayerSync]) -> None:
        if layer_sync is not None:
            raise MSRConfigurationError(_SYNC_BATCHNORM_MESSAGE)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # Runs after the callbacks' `setup` (where MeanShiftRejection / DeepControl replace BatchNorm) and before
        # DDP wraps the model, so a model that would train on per-rank batch statistics never starts.
        if trainer.state.fn == TrainerFn.FITTING and self.model is not None:
            _refuse_batchnorm(self.model)
        super().setup(trainer)

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        if not _DDP_HAS_FORWARD_SYNC_BUFFERS and not self._broadcast_buffers:
            assert isinstance(self.model, DistributedDataParallel)
            _broadcast_buffers_once(self.model)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """Register ``"ddp_msr"`` (popen) and ``"ddp_msr_spawn"`` (spawn) in ``strategy_registry``.

        Registering again -- a second import, or :func:`importlib.reload` of this module -- replaces the entries
        by the current class. A name that another class already holds is left alone, with a warning.

        Args:
            strategy_registry: the registry, e.g. ``lightning.pytorch.strategies.StrategyRegistry``.

        Example::

            >>> from lightning.fabric.strategies.registry import _StrategyRegistry
            >>> from lightning_msr import MSRDDPStrategy
            >>> registry = _StrategyRegistry()
            >>> MSRDDPStrategy.register_strategies(registry)
            >>> MSRDDPStrategy.register_strategies(registry)  # harmless
            >>> sorted(registry)
            ['ddp_msr', 'ddp_msr_spawn']
        """
        for name, start_method in _REGISTERED_NAMES:
            if name in strategy_registry:
                holder = strategy_registry[name]["strategy"]
                if not _same_class(holder, cls):
                    rank_zero_warn(
                        f"The strategy name {name!r} is already registered to {holder!r}; lightning_msr leaves it "
                        f"there. Pass `strategy={cls.__name__}(start_method={start_method!r})` to use {cls.__name__}.",
                        category=MSRWarning,
                    )
                    continue
            strategy_registry.register(
                name,
                cls,
                description=(
                    f"DDP for models without BatchNorm (Mean Shift Rejection): no SyncBatchNorm, buffers broadcast "
                    f"once, `start_method` {start_method!r}"
                ),
                override=True,
                start_method=start_method,
            )


def _same_class(registered: Any, cls: type) -> bool:
    """Whether ``registered`` is ``cls`` or an earlier version of it (from before an ``importlib.reload``)."""
    if registered is cls:
        return True
    return (
        isinstance(registered, type)
        and registered.__module__ == cls.__module__
        and registered.__qualname__ == cls.__qualname__
    )


def _refuse_batchnorm(model: nn.Module) -> None:
    names = list(find_batchnorm(model))
    if not names:
        return
    shown = _shown(names)
    raise MSRConfigurationError(
        f"MSRDDPStrategy ('ddp_msr') does not synchronise BatchNorm, but the model still contains {len(names)} "
        f"BatchNorm layer(s) ({shown}) as fitting starts. Each rank would normalise with the statistics of its own "
        "batch and keep its own running statistics. Add `lightning_msr.MeanShiftRejection(batchnorm='replace')` or "
        "`lightning_msr.DeepControl()` to the Trainer's callbacks -- they replace BatchNorm in their setup, before "
        "this check -- or remove the BatchNorm layers from the model; to keep BatchNorm, use `strategy='ddp'` "
        "(with `sync_batchnorm=True` for synchronised statistics)."
    )


def _broadcast_buffers_once(model: DistributedDataParallel) -> None:
    """Broadcast the module's buffers from rank 0: what DDP's own initial sync skips on torch < 2.13."""
    ignored = set(getattr(model, "parameters_to_ignore", ()))
    buffers = [buffer for name, buffer in model.module.named_buffers() if name not in ignored]
    for buffer in buffers:
        torch.distributed.broadcast(buffer.data, src=0, group=model.process_group)


MSRDDPStrategy.register_strategies(StrategyRegistry)
