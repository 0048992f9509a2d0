"""The examples: the demo's training code on a small subset, and the CIFAR-10 example on a tiny on-disk fixture."""

from __future__ import annotations

import csv
import doctest
import hashlib
import importlib
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not installed: import them from the repository
    sys.path.insert(0, str(ROOT))

from helpers import DEFAULT_MODE  # noqa: E402

import lightning_msr  # noqa: E402
from examples import demo  # noqa: E402
from examples.cifar10.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule  # noqa: E402
from examples.digits.data import DigitsDataModule, load_digits_splits  # noqa: E402
from examples.digits.model import SmallCNN  # noqa: E402
from lightning_msr.functional import eligible_weights, mean_shift  # noqa: E402


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when `args` is given while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["main.py"])


@pytest.mark.parametrize(
    "module",
    [
        "examples.norms",
        "examples.classifier",
        "examples.digits.data",
        "examples.digits.model",
        "examples.cifar10.data",
        "examples.cifar10.model",
    ],
)
def test_example_docstrings_run(module):
    """`make test` runs doctests over lightning_msr/ only; the examples' docstring examples are run here."""
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------------------- digits + demo
def test_digits_split_is_fixed_stratified_and_normalised():
    a, b = load_digits_splits(split_seed=0), load_digits_splits(split_seed=0)
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    counts = np.bincount(a["test"][1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 360 test images, stratified over 10 classes
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    x = dm.train_set.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1.0) < 1e-3
    assert all(len(batch[0]) == 32 for batch in dm.train_dataloader())  # drop_last: BatchNorm sees 32 every step
    with pytest.raises(ValueError, match="Expected `batch_size` to be a positive integer"):
        DigitsDataModule(batch_size=0)


def test_small_cnn_variants():
    x = torch.randn(3, 1, 8, 8)
    for norm, norm_type in (("batchnorm", torch.nn.BatchNorm2d), ("affine", lightning_msr.nn.affine.ChannelAffine)):
        model = SmallCNN(norm=norm, width=4)
        assert sum(isinstance(m, norm_type) for m in model.modules()) == 4
        assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert model(x).shape == (3, 10)
    assert sum(isinstance(m, lightning_msr.nn.AutomaticGainControl) for m in SmallCNN(norm="agc").modules()) == 4
    plain = SmallCNN(norm="none", width=4)
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="Expected `norm` to be one of"):
        SmallCNN(norm="layernorm")


@pytest.mark.parametrize(("callback", "recorded"), [("DeepControl", "agc_fold"), ("MeanShiftRejection", "fold")])
def test_checkpoint_after_batchnorm_surgery_reloads(tmp_path, callback, recorded):
    """A callback swaps BatchNorm during fit; the checkpoint records it and load_from_checkpoint rebuilds it."""
    import lightning as L

    kwargs = {"batchnorm": "replace"} if callback == "MeanShiftRejection" else {}
    model = SmallCNN(norm="batchnorm", width=4)
    trainer = L.Trainer(
        max_steps=2, callbacks=[getattr(lightning_msr, callback)(**kwargs)], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=4, max_train_samples=8))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = SmallCNN.load_from_checkpoint(tmp_path / "model.ckpt")
    assert restored.hparams.norm == recorded and model.hparams.norm == "batchnorm"
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(restored.eval()(x), model.eval()(x))


@pytest.fixture
def one_thread():
    """8x8 images in small batches train fastest on one intra-op thread (as `examples/demo.py` does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_demo_on_a_subset_writes_table_csv_and_plot(tmp_path, capsys, one_thread):
    results = demo.run_demo(tmp_path, batch_sizes=(16, 4), max_epochs=1, max_train_samples=48, progress_bar=False)
    assert [(r.method, r.batch_size) for r in results] == [
        (method, bs) for bs in (16, 4) for method in ("BatchNorm", "no normalisation", "MSR + noise")
    ]
    for r in results:
        assert r.epochs == 1 and r.steps == 48 // r.batch_size
        assert 0.0 <= r.test_acc <= 1.0 and r.seconds > 0
        assert r.lr == pytest.approx(demo.learning_rate(r.method, r.batch_size))
        if r.method == "MSR + noise":  # the MSR run really ran MSR: its kernels are on the zero-mean isocline
            assert r.mean_shift < 1e-5
        else:
            assert r.mean_shift > 1e-2
    printed = capsys.readouterr().out
    assert "| method | batch size |" in printed
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 6 and {"method", "batch_size", "test_acc", "seconds", "epochs"} <= rows[0].keys()
    assert float(rows[0]["test_acc"]) == pytest.approx(results[0].test_acc)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("| MSR + noise |") == 2
    assert (tmp_path / "accuracy_vs_batch_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_learning_rates_scale_linearly_then_with_the_square_root():
    base = demo.BASE_LR["MSR + noise"]
    assert demo.learning_rate("MSR + noise", 64) == base
    assert demo.learning_rate("MSR + noise", 8) == pytest.approx(base / 8)
    assert demo.learning_rate("MSR + noise", 2) == pytest.approx(base / 8 / 2)
    assert demo.learning_rate("MSR + noise", 1) == pytest.approx(base / 8 / math.sqrt(8))


def test_demo_trains_fewer_epochs_only_below_batch_8():
    assert [demo.epochs_at(b, 10) for b in (64, 8, 4, 1)] == [10, 10, 2, 2]
    assert demo.epochs_at(1, 3) == 1
    # batch 1 still takes more optimizer steps than batch 8 over the demo's 1257 training images
    assert demo.epochs_at(1, 10) * 1257 > demo.epochs_at(8, 10) * math.ceil(1257 / 8)


def test_demo_training_learns(one_thread):
    """Not just runs: 160 steps on 512 images put both BatchNorm and MSR + noise far above chance (10%)."""
    for method in ("BatchNorm", "MSR + noise"):
        result = demo.train_once(method, 16, 5, max_train_samples=512, progress_bar=False)
        assert result.steps == 160 and result.val_acc > 0.4, result


def test_demo_command_line(tmp_path, one_thread):
    demo.main(
        ["--out", str(tmp_path), "--batch-sizes", "8", "--max-epochs", "1", "--max-train-samples", "16",
         "--no-progress-bar"]
    )
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == len(demo.METHODS)
    with pytest.raises(ValueError, match="Expected `methods` to be among"):
        demo.run_demo(None, methods=["LayerNorm"])


# --------------------------------------------------------------------------------------------- CIFAR-10
def _write_fake_cifar10(root: Path, per_batch: int = 6) -> dict[str, str]:
    """Write a tiny dataset in CIFAR-10's on-disk format; return each file's md5.

    The format of https://www.cs.toronto.edu/~kriz/cifar.html (python version): ``cifar-10-batches-py/``
    holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each a pickled dict with ``data``
    (uint8, ``(N, 3072)``: the red, then green, then blue 32x32 plane of each image, row-major) and
    ``labels`` (a list of ints), and ``batches.meta`` with ``label_names``.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            "batch_label": f"fake batch {i}",
            "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"num_cases_per_batch": per_batch, "label_names": labels, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """A tiny CIFAR-10 on disk that torchvision's real CIFAR10 class reads.

    ``torchvision.datasets.CIFAR10`` verifies every file against the md5 of the official release
    (``train_list``, ``test_list`` and ``meta`` class attributes) before it reads anything, and refuses the
    directory otherwise. The fixture files are different files, so the test points those expected md5s at
    the fixture's own: the integrity check, the unpickling, the reshaping and the metadata loading all run
    the real loader's code. ``download=False`` keeps the network out of it.
    """
    from torchvision.datasets import CIFAR10

    root = tmp_path / "data"
    md5 = _write_fake_cifar10(root)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return root


def test_cifar10_datamodule_reads_the_on_disk_format(fake_cifar10):
    dm = CIFAR10DataModule(data_dir=fake_cifar10, batch_size=4, num_workers=0, val_size=6, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 5 * 6 - 6 and len(dm.val_set) == 6 and len(dm.test_set) == 6
    assert dm.test_set.classes[3] == "cat"
    # a validation image (no augmentation) is the fixture's bytes, normalised, in (C, H, W)
    for position, index in enumerate(dm.val_set.indices):
        file, row = f"data_batch_{index // 6 + 1}", index % 6  # the training files are read in order
        batch = pickle.loads((fake_cifar10 / "cifar-10-batches-py" / file).read_bytes())
        image, label = dm.val_set[position]
        expected = torch.from_numpy(batch["data"][row].reshape(3, 32, 32)).float() / 255
        expected = (expected - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
        torch.testing.assert_close(image, expected)
        assert label == batch["labels"][row]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_cifar10_missing_data_without_download_is_refused(tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path, download=False, num_workers=0)
    with pytest.raises(RuntimeError, match="Dataset not found or corrupted"):
        dm.prepare_data()


def test_cifar10_cli_end_to_end_with_msr_config(fake_cifar10, tmp_path):
    from examples.cifar10.main import cli_main

    config = ROOT / "examples" / "cifar10" / "config_msr.yaml"
    # the fixture's data and a CPU Trainer, for both runs below
    common = [
        f"--config={config}",
        f"--data.data_dir={fake_cifar10}",
        "--data.download=false",
        "--data.val_size=4",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
    ]
    cli = cli_main(
        [
            "fit",
            *common,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 2
    # the unchanged torchvision ResNet-18 lost its BatchNorm at fit setup, and its kernels are zero-mean
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.net.conv1.kernel_size == (3, 3) and model.net.conv1.stride == (1, 1)
    assert isinstance(model.net.maxpool, torch.nn.Identity)
    kernels = eligible_weights(model)
    assert len(kernels) == 20  # resnet18: stem + 16 block convs + 3 downsample 1x1 convs
    assert max(float(mean_shift(k.parameter, mode=DEFAULT_MODE, **k.layout_kwargs())) for k in kernels) < 1e-5
    assert "val_acc" in trainer.callback_metrics
    (in_memory,) = trainer.test(model, datamodule=cli.datamodule, verbose=False)

    # evaluating the checkpoint in a new run: `test` runs no fit-time surgery, but the checkpoint records that
    # the network now has BatchNorm's scale folded into its convs, and LightningCLI rebuilds it that way
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["norm"] == "fold"
    assert model.hparams.norm == "batchnorm"  # the model's own hyper-parameters are unchanged
    tested = cli_main(
        [
            "test",
            *common,
            f"--ckpt_path={checkpoint}",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'test'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'test'}",
        ]
    )
    assert tested.model.hparams.norm == "fold"
    assert tested.trainer.callback_metrics["test_acc"] == pytest.approx(in_memory["test_acc"])
    assert tested.trainer.callback_metrics["test_loss"] == pytest.approx(in_memory["test_loss"], rel=1e-5)
