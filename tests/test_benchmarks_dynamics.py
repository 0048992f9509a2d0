"""``benchmarks/dynamics.py``: the trace measures what it says, and the script writes and resumes its files."""

from __future__ import annotations

import copy
import csv
import subprocess
import sys
from pathlib import Path

import helpers
import lightning as L
import pytest
import torch
from torch import nn

import lightning_msr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import dynamics  # noqa: E402


def test_dead_share_counts_channels_zero_for_every_sample_and_position():
    out = torch.zeros(3, 4, 2, 2)
    out[0, 0, 1, 1] = 1.0  # channel 0 alive in one sample at one position
    out[2, 3] = 0.5  # channel 3 alive in one sample
    assert dynamics.dead_share(out) == 0.5  # channels 1 and 2 dead
    assert dynamics.dead_share(torch.ones(2, 5)) == 0.0  # a Linear + ReLU output (N, C)


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
        with torch.no_grad():
            self.body[0].bias[1] = -1e3  # channel 1 can never be positive: dead, and it gets no gradient

    def training_step(self, batch, idx):
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_trace_records_dead_channels_signal_and_filter_growth_every_n_steps(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 1, 4, 4), torch.randint(0, 3, (24,)))
    trace = dynamics.Trace(every=2)
    trainer = helpers.trainer(tmp_path, callbacks=[trace])
    net = _Net()
    with torch.no_grad():  # what the first step's batch gives the classifier, before any update
        first = net.body[:3](data.tensors[0][:4])
        logits = net.body[3](first)
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=4))
    assert [r["step"] for r in trace.rows] == [0, 2, 4]  # 6 steps, every second one from the first
    assert all(r["dead"] == 0.25 and r["dead_max"] == 0.25 for r in trace.rows)  # 1 of 4 channels
    assert trace.rows[0]["filter_norm"] == 1.0
    assert trace.rows[-1]["filter_norm"] != 1.0  # lr 0.5 moved the filters
    assert abs(trace.rows[0]["feature_rms"] - float(first.pow(2).mean().sqrt())) < 1e-6
    assert abs(trace.rows[0]["logit_std"] - float(logits.std())) < 1e-6
    assert trace.rows[1]["feature_rms"] != trace.rows[0]["feature_rms"]
    assert not net.body[1]._forward_hooks and not net.body[3]._forward_hooks  # the hooks are removed at the end


def test_trace_records_the_gradient_ratio_and_the_share_the_clip_cuts(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    net = _Net()
    probe = copy.deepcopy(net)  # the first step's gradient, by hand: centred per filter, over the filter's norm
    nn.functional.cross_entropy(probe.body(data.tensors[0][:4]), data.tensors[1][:4]).backward()
    conv = probe.body[0].weight
    g = conv.grad.flatten(1) - conv.grad.flatten(1).mean(dim=1, keepdim=True)
    ratios = g.norm(dim=1) / conv.detach().flatten(1).norm(dim=1)
    assert ratios[1] == 0  # the dead channel gets no gradient
    trace = dynamics.Trace(every=1)
    helpers.trainer(tmp_path, callbacks=[trace]).fit(net, torch.utils.data.DataLoader(data, batch_size=4))
    first = trace.rows[0]
    assert abs(first["grad_ratio"] - float(ratios.median())) < 1e-6
    # no MeanShiftRejection in the run: the share above the default clip
    assert first["clipped"] == float((ratios > dynamics.DEFAULT_CLIP).float().mean())


@pytest.mark.parametrize(("clip", "share"), [(None, 0.0), (1e-9, 0.75)])
def test_trace_reads_the_clip_of_the_runs_mean_shift_rejection(tmp_path, clip, share):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    trace = dynamics.Trace(every=1)
    msr = lightning_msr.MeanShiftRejection(adaptive_clip=clip, include_stem=True, calibrate=False)
    helpers.trainer(tmp_path, callbacks=[msr, trace]).fit(_Net(), torch.utils.data.DataLoader(data, batch_size=4))
    # no clip cuts nothing; a clip of 1e-9 cuts every filter with a gradient (3 of 4: the bias kills one channel,
    # and without the calibration nothing revives it)
    assert [r["clipped"] for r in trace.rows] == [share, share]


def test_append_rows_gives_an_older_trace_file_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "dynamics.csv"
    old_fields = [f for f in dynamics.FIELDS if f not in ("grad_ratio", "clipped")]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({f: "1" for f in old_fields})
    dynamics.append_rows(path, [{f: "2" for f in dynamics.FIELDS}])
    with path.open(newline="") as fh:
        assert next(csv.reader(fh)) == dynamics.FIELDS
    old, new = dynamics.read_rows(path)
    assert all(old[f] == "1" for f in old_fields) and old["grad_ratio"] == old["clipped"] == ""
    assert all(v == "2" for v in new.values())


def test_dynamics_tiny_writes_the_table_and_plot_and_resumes(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "dynamics.py"),
        "--tiny",
        "--out",
        str(tmp_path),
        "--lrs",
        "0.1",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--methods",
        "batchnorm",
        "msr_replace_noise",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "dynamics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"batchnorm", "msr_replace_noise"}
    assert [r["step"] for r in rows if r["method"] == "batchnorm"] == ["0", "1", "2", "3"]  # 64 images, batch 16
    table = (tmp_path / "dynamics.md").read_text()
    assert "| digits | resnet8 | msr_replace_noise | 16 | 0.1 | 0 |" in table
    assert (tmp_path / "dynamics.png").stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0
    with (tmp_path / "dynamics.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)  # resumed: nothing run twice
