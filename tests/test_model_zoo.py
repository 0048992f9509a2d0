"""A per-family sample of the model population (``benchmarks/zoo.py``), adopted with the one-line defaults.

One model of every torchvision classification family (a small one, so that the sample fits CI's time), at batch
1 and 2, for ``MeanShiftRejection(batchnorm="replace")`` + ``NoiseInjection()`` and for ``DeepControl()`` +
``MeanShiftRejection()``, through the benchmark's own code: the signal reaching the classifier on the first batch
after calibration within 10x of BatchNorm's in training mode, finite losses for 30+ steps wherever BatchNorm's are
at its largest finite learning rate of the grid, every conv moved, and eval output independent of the batch. The
whole population is the benchmark's (``docs/benchmarks/zoo.md``), whose verdict also fails a run whose largest loss
passes 100x BatchNorm's: at those rates that is a draw of the run's tail, counted over the population there, not
asserted run by run here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torchvision

from lightning_msr import find_batchnorm

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import zoo  # noqa: E402

sys.path.remove(str(BENCH))

pytestmark = pytest.mark.free_stem  # the defaults as shipped, the stem left free

# a small model of each family (with BatchNorm where the family has it), one per torchvision module of classifiers
SAMPLE = {
    "alexnet": "alexnet",
    "convnext": "convnext_tiny",
    "densenet": "densenet121",
    "efficientnet": "efficientnet_b0",
    "googlenet": "googlenet",
    "inception": "inception_v3",
    "maxvit": "maxvit_t",
    "mnasnet": "mnasnet0_5",
    "mobilenetv2": "mobilenet_v2",
    "mobilenetv3": "mobilenet_v3_small",
    "regnet": "regnet_x_400mf",
    "resnet": "resnet18",
    "shufflenetv2": "shufflenet_v2_x0_5",
    "squeezenet": "squeezenet1_1",
    "swin_transformer": "swin_t",
    "vgg": "vgg11_bn",
    "vision_transformer": "vit_b_32",
}


def test_msr_option_reaches_both_recipes_and_is_read_as_a_literal():
    """`--msr-option KEY=VALUE` tries a setting on the population: every MeanShiftRejection of both recipes gets it."""
    from lightning_msr import MeanShiftRejection

    options = dict(zoo._option(text) for text in ("mode=kernel", "residual_scale=0.5", "adaptive_clip=None"))
    assert options == {"mode": "kernel", "residual_scale": 0.5, "adaptive_clip": None}
    for recipe in zoo.RECIPES:
        (msr,) = [cb for cb in zoo.recipe_callbacks(recipe, options) if isinstance(cb, MeanShiftRejection)]
        assert "mode='kernel'" in repr(msr) and "residual_scale=0.5" in repr(msr) and "adaptive_clip=None" in repr(msr)
        (plain,) = [cb for cb in zoo.recipe_callbacks(recipe) if isinstance(cb, MeanShiftRejection)]
        assert "mode='filter'" in repr(plain) and "residual_scale=0.3" in repr(plain)  # the defaults
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        zoo._option("mode")


def test_msr_option_is_checked_before_any_model_runs(tmp_path, capsys):
    from lightning_msr import MSRConfigurationError

    csv = str(tmp_path / "zoo.csv")
    with pytest.raises(SystemExit):
        zoo.main(["--models", "resnet18", "--csv", csv, "--msr-option", "moed=filter"])
    assert "--msr-option" in (err := capsys.readouterr().err) and "moed" in err
    with pytest.raises(MSRConfigurationError, match="Expected `mode` to be one of"):
        zoo.main(["--models", "resnet18", "--csv", csv, "--msr-option", "mode=filtre"])
    assert not (tmp_path / "zoo.csv").exists()  # nothing ran


def test_table_title_names_the_batch_sizes_its_rows_have(tmp_path):
    """The title says which batch sizes were run, not the script's defaults (a batch-2-only table said 1, 2 and 8)."""
    base = {"family": "resnet", "bn_lr": "0.1", "finite": "True", "unmoved": "0", "eval_diff": "0", "note": ""}
    row = dict(base, model="resnet18", batch="2", recipe="msr_replace_noise", passed="yes", signal="1.0", max_loss="3")
    text = zoo.write_table([row], tmp_path / "zoo.md")
    assert text.startswith("# Model population: every torchvision classifier at batch 2\n")
    rows = [dict(row, batch=b) for b in ("8", "1", "2")]
    assert zoo.write_table(rows, tmp_path / "zoo.md").splitlines()[0].endswith("at batch 1, 2 and 8")


def _row(**values):
    base = dict(model="efficientnet_b4", family="efficientnet", batch="2", recipe="msr_replace_noise", bn_lr="0.1",
                bn_max_loss="50", signal="1.5", finite="True", max_loss="30", unmoved="0", eval_diff="1e-06", note="",
                passed="yes")  # fmt: skip
    return dict(base, **values)


def test_a_run_whose_finite_loss_blew_up_fails():
    """Finite is not enough: a loss of 1e8 where BatchNorm's largest was 50 is a blown-up run (the verdict passed
    those before), and the table marks it; a run within LOSS_FACTOR x BatchNorm's, or a row without BatchNorm's
    largest loss on record (run before the column existed), is judged as before."""
    assert zoo.passes(_row(max_loss="900"), normalised=True)  # 18x BatchNorm's: noisy, not blown up
    blown = _row(max_loss="1.04e+08")
    assert zoo.blew_up(blown) and not zoo.passes(blown, normalised=True)
    assert "loss ✗" in zoo._cell(dict(blown, passed="NO"))
    assert not zoo.blew_up(_row(max_loss=f"{zoo.LOSS_FACTOR * 50 * 1.01:g}", bn_max_loss="")), "no reference: no bound"
    assert zoo.blew_up(_row(max_loss=f"{zoo.LOSS_FACTOR * 50 * 1.01:g}"))
    # the other checks are unchanged
    assert not zoo.passes(_row(signal="20"), normalised=True) and zoo.passes(_row(signal="20"), normalised=False)
    assert not zoo.passes(_row(finite="False"), normalised=True) and zoo.passes(_row(finite="False", bn_lr=""), True)
    assert not zoo.passes(_row(unmoved="2"), normalised=True) and not zoo.passes(_row(eval_diff="0.01"), True)
    # the table's marks are the verdict's failed checks
    assert zoo.failed_checks(dict(blown, signal="20", eval_diff="0.01"), normalised=True) == ["signal", "loss", "eval"]
    assert zoo._cell(dict(blown, signal="20", eval_diff="0.01", passed="NO")).endswith("**20x · 1.04e+08** loss eval ✗")


def test_eval_check_finds_a_batch_dependence_and_not_float32_rounding():
    """The eval check measures whether an output depends on the rest of the batch, in float64 on a copy: a net whose
    activations reach 1e4 differs by float32 rounding alone between batch and one-by-one passes, and that is not a
    batch dependence (nor is the model it is given changed)."""
    import torch
    from torch import nn

    class BatchCentred(nn.Module):  # what the check is for: eval output that depends on the other samples
        def forward(self, x):
            return x - x.mean(dim=0, keepdim=True)

    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    big = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(64 * 16, 10))
    with torch.no_grad():
        for m in big.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(30.0)  # logits in the thousands: float32 alone differs by 2e-6 of them here
    assert zoo.eval_difference(big, x) < 1e-9
    assert next(big.parameters()).dtype == torch.float32 and big.training
    assert zoo.eval_difference(nn.Sequential(big, BatchCentred()), x) > 0.1


def test_results_file_from_before_a_column_is_upgraded_not_lost(tmp_path):
    """An interrupted sweep's CSV written before ``bn_max_loss`` existed keeps its rows when the sweep resumes."""
    import csv

    path = tmp_path / "zoo.csv"
    old_fields = [f for f in zoo.FIELDS if f != "bn_max_loss"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(_row(model="resnet18"))
    zoo._append(path, _row(model="resnet50", bn_max_loss="12"))
    assert zoo.read_header(path) == zoo.FIELDS
    rows = zoo.read_rows(path)
    assert [(r["model"], r["bn_max_loss"], r["max_loss"]) for r in rows] == [
        ("resnet18", "", "30"),
        ("resnet50", "12", "30"),
    ]


def test_the_sample_covers_every_family():
    families = {zoo.family(name) for name in torchvision.models.list_models(module=torchvision.models)}
    assert set(SAMPLE) == families
    assert all(zoo.family(model) == fam for fam, model in SAMPLE.items())


@pytest.mark.slow
@pytest.mark.timeout(1500)  # vgg11_bn at batch 1 took 7 minutes on a 2-core machine shared by 3 processes
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", sorted(SAMPLE.values()))
def test_default_adoption_of_each_family(tmp_path, name, batch):
    args = argparse.Namespace(
        steps=30, lrs=[0.1, 0.03, 0.01], max_params=150.0, csv=tmp_path / "zoo.csv", msr_options={}
    )
    rows = zoo.run_model(name, [batch], args, done=set())
    assert [r["recipe"] for r in rows] == list(zoo.RECIPES)
    normalised = bool(find_batchnorm(zoo.build(name, int(rows[0]["size"]))))
    for row in rows:
        # every check of the sweep's verdict but the loss bound: whether a run at BatchNorm's largest finite rate
        # passes 100x BatchNorm's largest loss is a draw, not a property (inception_v3 with Deep Control at batch 2
        # peaked at 28 in one process and at 8e4 in one started with OMP_NUM_THREADS=1, same seed); the sweep reports
        # how often it happens
        assert set(zoo.failed_checks(row, normalised)) <= {"loss"}, zoo._line(row)
        assert int(row["steps"]) >= 30 and int(row["steps"]) > int(row["calibration_steps"])
