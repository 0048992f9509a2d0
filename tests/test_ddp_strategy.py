"""MSRDDPStrategy ("ddp_msr"): registry, argument pass-through, refusals, and real 2-process CPU (gloo) runs.

The 2-process runs execute ``tests/ddp_scripts/msr_ddp_run.py`` in a subprocess: Lightning's ``popen`` launcher
starts the second rank by re-running the script (under pytest it would re-run pytest). Each rank writes what it
saw to ``rank{r}.pt``; the tests compare the ranks.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import DEFAULT_MODE, ConvNet, run_script, script_env
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_msr import MSRConfigurationError, MSRDDPStrategy, MSRWarning
from lightning_msr.functional import mean_shift
from lightning_msr.fused import fused_unavailable
from lightning_msr.strategies import ddp as ddp_module

SCRIPT = Path(__file__).parent / "ddp_scripts" / "msr_ddp_run.py"
CONV_WEIGHTS = ("net.0.weight", "net.3.weight")



def _trainer(**kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(kwargs)
    return L.Trainer(**settings)


# ---------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize(("name", "start_method"), [("ddp_msr", "popen"), ("ddp_msr_spawn", "spawn")])
def test_registered_on_import(name, start_method):
    entry = StrategyRegistry[name]
    assert entry["strategy"] is MSRDDPStrategy
    assert entry["init_params"] == {"start_method": start_method}
    assert "BatchNorm" in entry["description"]
    strategy = StrategyRegistry.get(name)
    assert isinstance(strategy, MSRDDPStrategy)
    assert strategy._start_method == start_method


def test_trainer_resolves_ddp_msr():
    trainer = _trainer(strategy="ddp_msr")
    strategy = trainer.strategy
    assert type(strategy) is MSRDDPStrategy
    assert isinstance(strategy, DDPStrategy)
    assert isinstance(strategy.launcher, _SubprocessScriptLauncher)
    assert trainer.world_size == 2
    assert strategy.broadcast_buffers is False


def test_trainer_resolves_ddp_msr_spawn():
    strategy = _trainer(strategy="ddp_msr_spawn").strategy
    assert type(strategy) is MSRDDPStrategy
    assert isinstance(strategy.launcher, _MultiProcessingLauncher)
    assert strategy.launcher._start_method == "spawn"


def test_registering_again_is_harmless():
    before = {name: dict(StrategyRegistry[name]) for name in ("ddp_msr", "ddp_msr_spawn")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MSRDDPStrategy.register_strategies(StrategyRegistry)
        importlib.import_module("lightning_msr.strategies.ddp")
        importlib.import_module("lightning_msr")
    for name, entry in before.items():
        assert StrategyRegistry[name] == entry
    assert type(_trainer(strategy="ddp_msr").strategy) is MSRDDPStrategy


def test_reload_registers_the_reloaded_class():
    saved = {name: StrategyRegistry[name] for name in ("ddp_msr", "ddp_msr_spawn")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", MSRWarning)
            reloaded = importlib.reload(ddp_module)
        new_class = reloaded.MSRDDPStrategy
        assert new_class is not MSRDDPStrategy
        assert StrategyRegistry["ddp_msr"]["strategy"] is new_class
        assert StrategyRegistry["ddp_msr_spawn"]["strategy"] is new_class
        assert type(_trainer(strategy="ddp_msr").strategy) is new_class
    finally:
        ddp_module.MSRDDPStrategy = MSRDDPStrategy
        StrategyRegistry.update(saved)
    assert StrategyRegistry["ddp_msr"]["strategy"] is MSRDDPStrategy


def test_registers_only_its_own_names():
    """The inherited DDPStrategy.register_strategies would register 'ddp', 'ddp_spawn', ... for this class."""
    registry = _StrategyRegistry()
    MSRDDPStrategy.register_strategies(registry)
    assert sorted(registry) == ["ddp_msr", "ddp_msr_spawn"]
    assert StrategyRegistry["ddp"]["strategy"] is DDPStrategy


def test_a_name_held_by_another_class_is_left_alone():
    registry = _StrategyRegistry()
    registry.register("ddp_msr", DDPStrategy, description="someone else's")
    with pytest.warns(MSRWarning, match="'ddp_msr' is already registered to"):
        MSRDDPStrategy.register_strategies(registry)
    assert registry["ddp_msr"]["strategy"] is DDPStrategy
    assert registry["ddp_msr_spawn"]["strategy"] is MSRDDPStrategy


# ---------------------------------------------------------------------------------------------- arguments

_SYNC_KEY = "forward_sync_buffers" if ddp_module._DDP_HAS_FORWARD_SYNC_BUFFERS else "broadcast_buffers"


def test_buffers_are_not_broadcast_per_step_by_default():
    strategy = MSRDDPStrategy()
    assert strategy.broadcast_buffers is False
    assert strategy._ddp_kwargs == {_SYNC_KEY: False}


def test_ddp_kwargs_pass_through_to_distributed_data_parallel():
    strategy = MSRDDPStrategy(find_unused_parameters=True, static_graph=True, gradient_as_bucket_view=True)
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": True,
        "gradient_as_bucket_view": True,
        _SYNC_KEY: False,
    }


def test_ddp_strategy_arguments_pass_through():
    strategy = MSRDDPStrategy(
        process_group_backend="gloo",
        timeout=timedelta(seconds=7),
        start_method="spawn",
        model_averaging_period=3,
    )
    assert strategy.process_group_backend == "gloo"
    assert strategy._timeout == timedelta(seconds=7)
    assert strategy._start_method == "spawn"
    assert strategy._model_averaging_period == 3


def test_broadcast_buffers_can_be_turned_back_on():
    strategy = MSRDDPStrategy(broadcast_buffers=True)
    assert strategy.broadcast_buffers is True
    assert strategy._ddp_kwargs == {_SYNC_KEY: True}


def test_forward_sync_buffers_is_accepted_as_the_new_name():
    strategy = MSRDDPStrategy(forward_sync_buffers=True)
    assert strategy.broadcast_buffers is True
    assert strategy._ddp_kwargs == {_SYNC_KEY: True}
    with pytest.raises(MSRConfigurationError, match="pass only one of them"):
        MSRDDPStrategy(broadcast_buffers=True, forward_sync_buffers=False)
    # None is DDP's own default (LightningCLI passes it explicitly): not given
    assert MSRDDPStrategy(forward_sync_buffers=None)._ddp_kwargs == {_SYNC_KEY: False}


def test_older_torch_gets_broadcast_buffers(monkeypatch):
    monkeypatch.setattr(ddp_module, "_DDP_HAS_FORWARD_SYNC_BUFFERS", False)
    assert MSRDDPStrategy()._ddp_kwargs == {"broadcast_buffers": False}
    assert MSRDDPStrategy(forward_sync_buffers=True)._ddp_kwargs == {"broadcast_buffers": True}


def test_broadcast_buffers_must_be_a_bool():
    with pytest.raises(MSRConfigurationError, match="Expected `broadcast_buffers` to be True or False, but got 'no'"):
        MSRDDPStrategy(broadcast_buffers="no")


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("strategy", ["ddp_msr", "ddp_msr_spawn", "instance"])
@pytest.mark.parametrize("devices", [1, 2])
def test_sync_batchnorm_is_refused_when_the_trainer_is_built(strategy, devices):
    strategy = MSRDDPStrategy() if strategy == "instance" else strategy
    with pytest.raises(MSRConfigurationError, match=r"refuses `Trainer\(sync_batchnorm=True\)`") as err:
        _trainer(strategy=strategy, devices=devices, sync_batchnorm=True)
    message = str(err.value)
    assert "synchronises the batch statistics of every layer" in message  # why
    assert "MeanShiftRejection(batchnorm='replace')" in message  # what to do
    assert "strategy='ddp'" in message


def test_a_layer_sync_plugin_is_refused():
    with pytest.raises(MSRConfigurationError, match="LayerSync"):
        _trainer(strategy="ddp_msr", plugins=[TorchSyncBatchNorm()])


def test_plain_ddp_still_accepts_sync_batchnorm():
    """The contrast: the refusal comes from MSRDDPStrategy, not from the Trainer."""
    assert isinstance(_trainer(strategy="ddp", sync_batchnorm=True).strategy._layer_sync, TorchSyncBatchNorm)


class _Model(L.LightningModule):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), *layers)


@pytest.mark.parametrize(
    "layer",
    [
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(4),
        nn.BatchNorm3d(4),
        nn.SyncBatchNorm(4),
        nn.LazyBatchNorm2d(),
        nn.Sequential(nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4))),
    ],
    ids=["bn1d", "bn2d", "bn3d", "syncbn", "lazybn", "nested"],
)
def test_batchnorm_model_is_refused_at_fit_setup(layer):
    strategy = MSRDDPStrategy()
    strategy.connect(_Model(layer))
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    with pytest.raises(MSRConfigurationError, match=r"still contains 1 BatchNorm layer\(s\) \('body\.1") as err:
        strategy.setup(trainer)
    assert "MeanShiftRejection(batchnorm='replace')" in str(err.value)
    assert "DeepControl()" in str(err.value)


def test_batchnorm_as_the_root_module_is_refused():
    with pytest.raises(MSRConfigurationError, match=r"\('<root>'\)"):
        ddp_module._refuse_batchnorm(nn.BatchNorm2d(3))


@pytest.mark.parametrize(
    "layer", [nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, track_running_stats=True), nn.LayerNorm(4), nn.Identity()]
)
def test_norms_without_batch_statistics_are_accepted(layer):
    ddp_module._refuse_batchnorm(_Model(layer))


# ---------------------------------------------------------------------------------------------- LightningCLI


def test_lightning_cli_selects_the_strategy_by_name(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["main.py"])  # the CLI reads `args`, not pytest's own arguments

    common = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.logger=false"]
    cli = LightningCLI(
        ConvNet, run=False, args=["--trainer.strategy=ddp_msr", *common], seed_everything_default=False
    )
    assert type(cli.trainer.strategy) is MSRDDPStrategy
    cli = LightningCLI(
        ConvNet,
        run=False,
        args=["--trainer.strategy=lightning_msr.MSRDDPStrategy", "--trainer.strategy.broadcast_buffers=true", *common],
        seed_everything_default=False,
    )
    assert type(cli.trainer.strategy) is MSRDDPStrategy
    assert cli.trainer.strategy.broadcast_buffers is True
    with pytest.raises(MSRConfigurationError, match="sync_batchnorm"):
        LightningCLI(
            ConvNet,
            run=False,
            args=["--trainer.strategy=ddp_msr", "--trainer.sync_batchnorm=true", *common],
            seed_everything_default=False,
        )


# ---------------------------------------------------------------------------------------------- 2-process runs


def _run(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, out, *args, timeout=timeout)


def _records(out: Path, result: subprocess.CompletedProcess) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    """MeanShiftRejection + NoiseInjection on 2 ranks, each rank seeded differently; checkpoint at the end."""
    out = tmp_path_factory.mktemp("ddp_fit")
    ckpt = out / "last.ckpt"
    records = _records(out, _run(out, "--noise", "--max-steps", "4", "--ckpt-out", str(ckpt)))
    return SimpleNamespace(records=records, ckpt=ckpt)


@pytest.mark.ddp
def test_ranks_start_bit_identical_although_seeded_differently(fit_run):
    rank0, rank1 = fit_run.records
    assert rank0["strategy"] == "MSRDDPStrategy"
    assert rank0["world_size"] == 2
    # before DDP wraps the model each rank holds its own zero-mean init (and its own buffer) ...
    for key in (*CONV_WEIGHTS, "probe_buffer"):
        assert not torch.equal(rank0["setup_state"][key], rank1["setup_state"][key]), key
    # ... once training starts both hold rank 0's, buffers included (broadcast once, at wrap time)
    assert _identical(rank0["start_state"], rank1["start_state"])
    assert _identical(rank0["start_state"], rank0["setup_state"])


@pytest.mark.ddp
def test_ranks_end_bit_identical_after_training(fit_run):
    rank0, rank1 = fit_run.records
    assert rank0["steps"] == rank1["steps"] == 4
    assert _identical(rank0["end_state"], rank1["end_state"])
    for key in CONV_WEIGHTS:
        assert not torch.equal(rank0["start_state"][key], rank0["end_state"][key]), f"{key} did not train"


@pytest.mark.ddp
@pytest.mark.parametrize("implementation", ["fused", "eager"])
def test_both_per_step_paths_keep_ranks_bit_identical(fit_run, tmp_path, implementation):
    """The default run above takes the fused kernel where it can (a C compiler here); the eager path is checked in
    its own run. Both must leave the two ranks with identical weights."""
    if implementation == "fused":
        records = fit_run.records
        assert all(r["fused"] is (fused_unavailable() is None) for r in records)
    else:
        records = _records(tmp_path, _run(tmp_path, "--noise", "--implementation", "eager"))
        assert not any(r["fused"] for r in records)
    assert _identical(records[0]["end_state"], records[1]["end_state"])
    assert not torch.equal(records[0]["start_state"]["net.0.weight"], records[0]["end_state"]["net.0.weight"])


@pytest.mark.ddp
def test_kernels_stay_on_the_isocline(fit_run):
    for record in fit_run.records:
        for key in CONV_WEIGHTS:
            assert float(mean_shift(record["end_state"][key], mode=DEFAULT_MODE)) < 1e-5, key


@pytest.mark.ddp
def test_keep_magnitude_holds_norms_identically_on_both_ranks(tmp_path):
    """The post-step rescaling runs on every rank on identical weights: they stay identical, at norm 1 (the plain
    draw's norm, without calibration; calibrated runs are checked identical by the other tests)."""
    args = ("--keep-magnitude", "--no-calibrate", "--max-steps", "4", "--seed-offset", "7")
    rank0, rank1 = _records(tmp_path, _run(tmp_path, *args))
    assert rank0["steps"] == 4
    assert _identical(rank0["end_state"], rank1["end_state"])
    for key in CONV_WEIGHTS:
        weight = rank0["end_state"][key]
        assert not torch.equal(rank0["start_state"][key], weight), f"{key} did not train"
        norms = weight.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=0)
        assert float(mean_shift(weight, mode=DEFAULT_MODE)) < 1e-5, key


@pytest.mark.ddp
def test_no_buffer_broadcast_per_forward(fit_run):
    for record in fit_run.records:
        assert record["ddp_broadcast_buffers"] is False


@pytest.mark.ddp
def test_noise_differs_per_rank(fit_run):
    rank0, rank1 = fit_run.records
    # the same input through the same weights: identical in eval mode, so a train-mode difference is the noise
    assert torch.equal(rank0["probe_eval"], rank1["probe_eval"])
    for record in fit_run.records:
        assert not torch.equal(record["probe_train"], record["probe_eval"]), "no noise in training"
    assert not torch.allclose(rank0["probe_train"], rank1["probe_train"])


@pytest.mark.ddp
def test_checkpoint_saved_by_rank0_resumes_on_two_ranks(fit_run, tmp_path):
    checkpoint = torch.load(fit_run.ckpt, weights_only=False)
    assert checkpoint["global_step"] == 4
    assert _identical(checkpoint["state_dict"], fit_run.records[0]["end_state"])
    # new processes, models built from other seeds: the checkpoint's weights must win on both ranks
    result = _run(tmp_path, "--noise", "--max-steps", "8", "--seed-offset", "100", "--ckpt-in", str(fit_run.ckpt))
    rank0, rank1 = _records(tmp_path, result)
    for record in (rank0, rank1):
        assert record["global_step_start"] == 4
        assert _identical(record["start_state"], checkpoint["state_dict"])
        assert record["steps"] == 4
        for key in CONV_WEIGHTS:
            assert float(mean_shift(record["end_state"][key], mode=DEFAULT_MODE)) < 1e-5
    assert _identical(rank0["end_state"], rank1["end_state"])
    assert not torch.equal(rank0["end_state"]["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    assert not torch.allclose(rank0["probe_train"], rank1["probe_train"])


@pytest.mark.ddp
def test_spawn_variant_trains_in_sync(tmp_path):
    rank0, rank1 = _records(tmp_path, _run(tmp_path, "--strategy", "ddp_msr_spawn", "--noise"))
    assert rank0["strategy"] == rank1["strategy"] == "MSRDDPStrategy"
    assert _identical(rank0["start_state"], rank1["start_state"])
    assert _identical(rank0["end_state"], rank1["end_state"])
    assert not torch.allclose(rank0["probe_train"], rank1["probe_train"])
    for key in CONV_WEIGHTS:
        assert float(mean_shift(rank0["end_state"][key], mode=DEFAULT_MODE)) < 1e-5


@pytest.mark.ddp
def test_buffers_synced_once_on_the_torch_before_2_13_path(tmp_path):
    """There, `broadcast_buffers=False` also leaves the buffers out of DDP's initial sync; the strategy adds it."""
    rank0, rank1 = _records(tmp_path, _run(tmp_path, "--legacy-buffers"))
    assert not torch.equal(rank0["setup_state"]["probe_buffer"], rank1["setup_state"]["probe_buffer"])
    assert _identical(rank0["start_state"], rank1["start_state"])
    assert _identical(rank0["end_state"], rank1["end_state"])
    assert rank0["ddp_broadcast_buffers"] is False


@pytest.mark.ddp
def test_batchnorm_replaced_by_the_callback_trains(tmp_path):
    """batchnorm='replace' folds BatchNorm's scale into the conv: both ranks stay identical, the direction on norm 1
    (the plain draw's norm: without calibration, which would rescale it)."""
    args = ("--batchnorm", "--msr-batchnorm", "replace", "--noise", "--keep-magnitude", "--no-calibrate")
    rank0, rank1 = _records(tmp_path, _run(tmp_path, *args))
    assert not any("running_mean" in key for key in rank0["start_state"])
    assert "net.0.scale" in rank0["start_state"]  # BatchNorm's affine part is kept and trained, in the conv
    assert not any(key.startswith("net.1.") for key in rank0["start_state"])
    assert _identical(rank0["start_state"], rank1["start_state"])
    assert _identical(rank0["end_state"], rank1["end_state"])
    for key in ("net.0.scale", "net.0.weight"):
        assert not torch.equal(rank0["start_state"][key], rank0["end_state"][key]), f"{key} did not train"
    direction = rank0["end_state"]["net.0.weight"]
    assert float(mean_shift(direction, mode=DEFAULT_MODE)) < 1e-5
    torch.testing.assert_close(direction.flatten(1).norm(dim=1), torch.ones(8), rtol=1e-5, atol=0)


@pytest.mark.ddp
def test_two_process_run_refuses_a_batchnorm_model(tmp_path):
    result = _run(tmp_path, "--batchnorm", "--msr-batchnorm", "warn")
    assert result.returncode != 0
    assert "MSRConfigurationError" in result.stderr
    assert "still contains 1 BatchNorm layer(s) ('net.1')" in result.stderr
    assert "MeanShiftRejection(batchnorm='replace')" in result.stderr
    assert not list(tmp_path.glob("rank*.pt"))


@pytest.mark.ddp
def test_two_process_run_refuses_sync_batchnorm(tmp_path):
    result = _run(tmp_path, "--sync-batchnorm")
    assert result.returncode != 0
    assert "MSRConfigurationError" in result.stderr
    assert "refuses `Trainer(sync_batchnorm=True)`" in result.stderr
    assert "Initializing distributed" not in result.stderr + result.stdout  # refused before any launch
    assert not list(tmp_path.glob("rank*.pt"))


# ---------------------------------------------------------------------------------------------- two nodes

# Two "nodes" on this machine: the script is started twice, once per node, each with one rank (`devices=1`),
# talking over 127.0.0.1 only. With the Lightning launcher both processes read NODE_RANK / MASTER_ADDR /
# MASTER_PORT / WORLD_SIZE (LightningEnvironment); under torchrun each torchrun agent starts its worker and the
# Trainer finds TorchElasticEnvironment. The adopted model has a BatchNorm that MeanShiftRejection replaces.
_NODE_ARGS = ("--num-nodes", "2", "--devices", "1", "--batchnorm", "--msr-batchnorm", "replace", "--noise")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_nodes(out: Path, *args: str, launcher: str = "lightning", timeout: float = 240) -> list[SimpleNamespace]:
    """Start one process per node (2 nodes), wait for both (bounded); returns returncode/stdout/stderr per node."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = script_env()
    script = [str(SCRIPT), "--out", str(out), *args]
    processes = []
    for node in range(2):
        env = dict(base)
        if launcher == "torchrun":
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
            rendezvous = ["--master-addr=127.0.0.1", f"--master-port={port}", "--max-restarts=0"]
            command = [*torchrun, f"--node-rank={node}", *rendezvous, *script]
        else:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), WORLD_SIZE="2")
            command = [sys.executable, *script]
        # its own session: on a timeout, killing the process group ends torchrun's worker with it
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        processes.append(subprocess.Popen(command, env=env, cwd=str(out), start_new_session=True, **pipes))
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.communicate()
    return results


def _node_records(out: Path, results: list[SimpleNamespace]) -> list[dict[str, Any]]:
    for node, result in enumerate(results):
        assert result.returncode == 0, f"node {node}:\n{result.stderr[-4000:]}"
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_nodes")
    ckpt = out / "last.ckpt"
    records = _node_records(out, _run_nodes(out, *_NODE_ARGS, "--max-steps", "4", "--ckpt-out", str(ckpt)))
    return SimpleNamespace(records=records, ckpt=ckpt)


def _assert_trained_in_sync_across_nodes(records: list[dict[str, Any]], environment: str) -> None:
    rank0, rank1 = records
    for rank, record in enumerate(records):
        assert record["strategy"] == "MSRDDPStrategy"
        assert record["cluster_environment"] == environment
        assert (record["world_size"], record["num_nodes"]) == (2, 2)
        assert (record["global_rank"], record["node_rank"]) == (rank, rank)  # one rank per node
        assert record["steps"] == 4
    assert (rank0["seed"], rank1["seed"]) == (0, 1)
    # BatchNorm replaced on both nodes, its affine part kept (folded into the conv)
    assert not any("running_mean" in key for key in rank0["start_state"])
    assert "net.0.scale" in rank0["start_state"]
    # each node drew its own zero-mean init (different seeds) ...
    for key in CONV_WEIGHTS:
        assert not torch.equal(rank0["setup_state"][key], rank1["setup_state"][key]), key
    # ... and both start from node 0's, buffers included, and end bit-identical after training
    assert _identical(rank0["start_state"], rank0["setup_state"])
    assert _identical(rank0["start_state"], rank1["start_state"])
    assert _identical(rank0["end_state"], rank1["end_state"])
    for key in (*CONV_WEIGHTS, "net.0.scale"):
        assert not torch.equal(rank0["start_state"][key], rank0["end_state"][key]), f"{key} did not train"
    for key in CONV_WEIGHTS:
        assert float(mean_shift(rank0["end_state"][key], mode=DEFAULT_MODE)) < 1e-5, key
    # noise: the same input through the same weights differs between the nodes in training only
    assert torch.equal(rank0["probe_eval"], rank1["probe_eval"])
    assert not torch.allclose(rank0["probe_train"], rank1["probe_train"])
    for record in records:
        assert record["ddp_broadcast_buffers"] is False


@pytest.mark.ddp
def test_two_nodes_train_in_sync(two_node_run):
    _assert_trained_in_sync_across_nodes(two_node_run.records, "LightningEnvironment")


@pytest.mark.ddp
def test_two_node_checkpoint_resumes_on_one_node(two_node_run, tmp_path):
    checkpoint = torch.load(two_node_run.ckpt, weights_only=False)
    assert checkpoint["global_step"] == 4
    assert _identical(checkpoint["state_dict"], two_node_run.records[0]["end_state"])
    args = ("--devices", "1", "--batchnorm", "--msr-batchnorm", "replace", "--noise", "--seed-offset", "100")
    result = _run(tmp_path, *args, "--max-steps", "8", "--ckpt-in", str(two_node_run.ckpt))
    assert result.returncode == 0, result.stderr[-4000:]
    record = torch.load(tmp_path / "rank0.pt")
    assert (record["world_size"], record["num_nodes"]) == (1, 1)
    assert record["global_step_start"] == 4
    assert _identical(record["start_state"], checkpoint["state_dict"])  # not re-initialised from seed 100
    assert record["steps"] == 4
    assert not torch.equal(record["end_state"]["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    for key in CONV_WEIGHTS:
        assert float(mean_shift(record["end_state"][key], mode=DEFAULT_MODE)) < 1e-5, key


@pytest.mark.ddp
@pytest.mark.slow
def test_two_node_checkpoint_resumes_on_two_nodes(two_node_run, tmp_path):
    checkpoint = torch.load(two_node_run.ckpt, weights_only=False)
    resume = ("--max-steps", "8", "--seed-offset", "100", "--ckpt-in", str(two_node_run.ckpt))
    results = _run_nodes(tmp_path, *_NODE_ARGS, *resume)
    rank0, rank1 = _node_records(tmp_path, results)
    for record in (rank0, rank1):
        assert record["global_step_start"] == 4
        assert _identical(record["start_state"], checkpoint["state_dict"])
        assert record["steps"] == 4
    assert _identical(rank0["end_state"], rank1["end_state"])
    assert not torch.equal(rank0["end_state"]["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    assert not torch.allclose(rank0["probe_train"], rank1["probe_train"])


@pytest.mark.ddp
def test_sync_batchnorm_is_refused_on_every_node(tmp_path):
    results = _run_nodes(tmp_path, *_NODE_ARGS, "--sync-batchnorm", timeout=120)
    for node, result in enumerate(results):
        assert result.returncode != 0, f"node {node} was not refused"
        assert "MSRConfigurationError" in result.stderr, f"node {node}:\n{result.stderr[-2000:]}"
        assert "refuses `Trainer(sync_batchnorm=True)`" in result.stderr
        # refused while the Trainer is built, so no node waits for a peer that will never come
        assert "Initializing distributed" not in result.stderr + result.stdout
    assert not list(tmp_path.glob("rank*.pt"))


@pytest.mark.ddp
@pytest.mark.slow
def test_two_nodes_under_torchrun_train_in_sync(tmp_path):
    results = _run_nodes(tmp_path, *_NODE_ARGS, "--max-steps", "4", launcher="torchrun")
    _assert_trained_in_sync_across_nodes(_node_records(tmp_path, results), "TorchElasticEnvironment")
