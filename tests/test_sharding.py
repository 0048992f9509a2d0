"""Mean Shift Rejection on FSDP2-sharded parameters (``lightning_msr._sharding``), and the strategies it refuses.

The 2-process runs execute ``tests/ddp_scripts/msr_fsdp2_run.py``: Lightning's ``ModelParallelStrategy`` with
FSDP2's ``fully_shard`` on 2 CPU processes (gloo), compared with an unsharded single-process run that trains on the
same 16 samples per step (the union of the two ranks' batches).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import DEFAULT_MODE, ConvNet, run_script

from lightning_msr import MeanShiftRejection, MSRConfigurationError
from lightning_msr._sharding import copy_shard_, is_sharded, local_shape, local_shard, shard_problem
from lightning_msr.callbacks.mean_shift_rejection import _unsupported_strategy
from lightning_msr.functional import mean_shift

SCRIPT = Path(__file__).parent / "ddp_scripts" / "msr_fsdp2_run.py"
CONV_WEIGHTS = ("net.0.weight", "net.2.weight", "net.4.weight")


# ---------------------------------------------------------------------------------------------- plain tensors


def test_plain_tensors_pass_through():
    weight = torch.randn(4, 3, 3, 3)
    assert not is_sharded(weight)
    assert local_shard(weight) is weight
    assert local_shape(weight) == weight.shape
    assert shard_problem(weight, keep_magnitude=True) is None
    full = torch.randn(4, 3, 3, 3)
    assert torch.equal(copy_shard_(weight, full), full)


@pytest.mark.parametrize(
    ("shape", "mode", "transposed", "group_dims", "norm_dims"),
    [
        ((8, 4, 3, 3), "kernel", False, {2, 3}, {1, 2, 3}),  # spatial: (o, i) slices; dim 0 is free
        ((8, 4, 1, 1), "kernel", False, {1}, {1, 2, 3}),  # pointwise: the inputs of each filter
        ((8, 4, 3, 3), "filter", False, {1, 2, 3}, {1, 2, 3}),  # Gradient Centralization: whole rows
        ((8, 4), "kernel", False, {1}, {1}),  # Linear
        ((4, 8, 3, 3), "kernel", True, {2, 3}, {0, 2, 3}),  # transposed spatial: groups whole, norms span dim 0
        ((4, 8, 1, 1), "kernel", True, {0}, {0, 2, 3}),  # transposed pointwise: groups span dim 0
    ],
    ids=["spatial", "pointwise", "filter", "linear", "transposed", "transposed-pointwise"],
)
def test_which_dims_a_group_and_a_filter_norm_span(shape, mode, transposed, group_dims, norm_dims):
    """FSDP2 shards dim 0: fine unless dim 0 is in the groups (or, for keep_magnitude, in the norms)."""
    from lightning_msr._sharding import _group_dims

    assert _group_dims(shape, mode, transposed) == (group_dims, norm_dims)


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("strategy", "why"),
    [
        ("FSDPStrategy", r"flattens and shards the parameters of each unit \(FSDP1\)"),
        ("DeepSpeedStrategy", "flattens and partitions parameters and gradients"),
    ],
)
def test_flat_parameter_strategies_are_refused_with_the_way_out(strategy, why):
    fake = type(strategy, (), {})()  # matched by class name: DeepSpeed need not be installed
    message = _unsupported_strategy(fake)
    assert message is not None
    assert f"{strategy} is not supported: it" in message
    assert re.search(why, message)
    assert "a kernel group can be split across ranks" in message
    assert "'ddp_msr'" in message and "ModelParallelStrategy" in message and "fully_shard" in message


def test_fsdp1_is_refused_at_setup():
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(MSRConfigurationError, match=r"FSDPStrategy is not supported: it flattens.*Parallel"):
        MeanShiftRejection().setup(SimpleNamespace(strategy=FSDPStrategy(), ckpt_path=None), ConvNet(), "fit")


def test_model_parallel_strategy_is_accepted():
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert _unsupported_strategy(ModelParallelStrategy()) is None


# ---------------------------------------------------------------------------------------------- 2-process runs


def _run(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, out, *args, timeout=timeout)


def _records(out: Path, result: subprocess.CompletedProcess, ranks: int) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(ranks)]


def _sharded_and_reference(tmp_path_factory, name: str, *args: str) -> SimpleNamespace:
    sharded, reference = tmp_path_factory.mktemp(name), tmp_path_factory.mktemp(f"{name}_reference")
    return SimpleNamespace(
        ranks=_records(sharded, _run(sharded, *args), 2),
        reference=_records(reference, _run(reference, "--devices", "1", *args), 1)[0],
    )


@pytest.fixture(scope="module")
def built_in_init(tmp_path_factory):
    """Model built in ``__init__``: initialised at ``setup``, then sharded in ``configure_model``."""
    return _sharded_and_reference(tmp_path_factory, "fsdp2_init")


@pytest.fixture(scope="module")
def built_in_configure_model(tmp_path_factory):
    """Model built (and sharded) in ``configure_model``: zero-mean initialised on the DTensor shards."""
    return _sharded_and_reference(tmp_path_factory, "fsdp2_late", "--build-in-configure-model", "--keep-magnitude")


def _assert_matches_unsharded(run: SimpleNamespace) -> None:
    rank0, rank1 = run.ranks
    assert rank0["strategy"] == "ModelParallelStrategy" and rank0["world_size"] == 2
    assert run.reference["world_size"] == 1
    # every conv weight is sharded along its output filters; 5 filters split unevenly, 3 + 2
    for name in CONV_WEIGHTS:
        assert rank0["shards"][name][0] == "(Shard(dim=0),)"
    assert (rank0["shards"]["net.0.weight"][1][0], rank1["shards"]["net.0.weight"][1][0]) == (3, 2)
    # the gathered weights are the same on both ranks, and equal the unsharded run's: at start bit for bit,
    # after training up to float rounding (FSDP2 reduce-scatters the gradients, one process sums them)
    for state in ("start_state", "end_state"):
        assert rank0[state].keys() == run.reference[state].keys()
        for key, value in rank0[state].items():
            assert torch.equal(value, rank1[state][key]), (state, key)
    for key, value in rank0["start_state"].items():
        assert torch.equal(value, run.reference["start_state"][key]), key
    for key, value in rank0["end_state"].items():
        torch.testing.assert_close(value, run.reference["end_state"][key], rtol=0, atol=1e-6)
        moved = (value - rank0["start_state"][key]).abs().max()
        assert moved > 1e-3, f"{key} did not train"
    for key in CONV_WEIGHTS:
        assert float(mean_shift(rank0["start_state"][key], mode=DEFAULT_MODE)) < 1e-6, key
        assert float(mean_shift(rank0["end_state"][key], mode=DEFAULT_MODE)) < 1e-5, key


@pytest.mark.ddp
def test_fsdp2_trains_like_the_unsharded_model(built_in_init):
    _assert_matches_unsharded(built_in_init)


@pytest.mark.ddp
@pytest.mark.slow
def test_zero_mean_init_on_shards_gives_the_unsharded_weights(built_in_configure_model):
    """The draw is of the whole tensor on every rank, each keeping its shard: no collective, same global weights."""
    _assert_matches_unsharded(built_in_configure_model)
    for key in CONV_WEIGHTS:
        for state in ("start_state", "end_state"):
            weight = built_in_configure_model.ranks[0][state][key]
            norms = weight.flatten(1).norm(dim=1)  # keep_magnitude: every filter at norm 1, computed per shard
            torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=0)


@pytest.mark.ddp
def test_a_sharding_that_splits_kernel_groups_is_refused(tmp_path):
    result = _run(tmp_path, "--transposed-pointwise", timeout=240)
    assert result.returncode != 0
    assert "MSRConfigurationError" in result.stderr
    assert "cannot act on a weight of shape (4, 4, 1, 1) sharded as (Shard(dim=0),)" in result.stderr
    assert "sharded along dim 0, which its kernel groups span" in result.stderr
    assert not list(tmp_path.glob("rank*.pt"))
