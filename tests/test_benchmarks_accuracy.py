"""The benchmark scripts run end to end on a tiny setting and write what they promise (not the full sweeps)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEFAULT_MODE

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _fail(script: str, *args: str) -> str:
    """Run a benchmark that must fail; its stderr."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    return proc.stderr


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_accuracy_tiny_writes_outputs_and_resumes(tmp_path):
    base = [
        "--tiny",
        "--out",
        str(tmp_path),
        "--no-progress-bar",
        "--dataset",
        "digits",
        "shapes",
        "--methods",
        "batchnorm",
        "msr_affine[init_magnitude=1.5]",
        "--batch-sizes",
        "2",
        "16",
        "--lrs",
        "0.05",
    ]
    out = _run("accuracy.py", *base, "--seeds", "0")
    assert "8 to run" in out
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 2 * 2 * 2  # datasets x methods x batch sizes
    assert {r["method"] for r in rows} == {"batchnorm", "msr_affine[init_magnitude=1.5]"}
    assert {int(r["batch_size"]) for r in rows} == {2, 16}
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        assert int(r["steps"]) > 0
        # the MSR variant has no normalisation layer anywhere; the BatchNorm baseline has
        assert int(r["norm_layers"]) == (r["method"] == "batchnorm")
        assert ("MeanShiftRejection" in r["callbacks"]) == r["method"].startswith("msr")
    # the learning rate is given for batch 32 and scaled by sqrt(batch / 32)
    assert {float(r["lr"]) for r in rows if r["batch_size"] == "2"} == {0.0125}
    for name in ("accuracy.md", "accuracy_vs_batch.png", "accuracy_vs_lr.png"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "accuracy.md").read_text()
    assert "## digits" in md and "## shapes" in md and "`msr_affine[init_magnitude=1.5]`" in md and "±" in md

    # resumable: the same command runs nothing; adding a seed runs only the new configurations
    assert "0 to run" in _run("accuracy.py", *base, "--seeds", "0", "--no-report")
    assert len(_rows(tmp_path / "accuracy.csv")) == 8
    out = _run("accuracy.py", *base, "--seeds", "0", "1", "--no-report")
    assert "8 already in" in out and "8 to run" in out
    rows = _rows(tmp_path / "accuracy.csv")
    assert len(rows) == 16 and {r["seed"] for r in rows} == {"0", "1"}


def test_accuracy_rejects_unknown_method(tmp_path):
    assert "Expected a method in" in _fail("accuracy.py", "--tiny", "--out", str(tmp_path), "--methods", "layernorm")
    assert not (tmp_path / "accuracy.csv").exists()


def test_speed_tiny_writes_ratios(tmp_path):
    _run("speed.py", "--tiny", "--out", str(tmp_path), "--methods", "batchnorm", "msr", "folded", "no_norm")
    rows = {r["method"]: r for r in _rows(tmp_path / "speed.csv")}
    assert set(rows) == {"batchnorm", "msr", "folded", "no_norm"}
    # `folded` is MSR's model without the callback: the same saved activations, and the floor's too
    assert rows["folded"]["saved_bytes"] == rows["msr"]["saved_bytes"] == rows["no_norm"]["saved_bytes"]
    assert float(rows["batchnorm"]["step_ratio"]) == pytest.approx(1.0)
    assert float(rows["batchnorm"]["saved_ratio"]) == pytest.approx(1.0)
    for r in rows.values():
        assert float(r["step_ms"]) > 0 and int(r["saved_bytes"]) > 0
    # MSR swaps BatchNorm for a per-channel affine: it must not save more activations than BatchNorm
    assert int(rows["msr"]["saved_bytes"]) <= int(rows["batchnorm"]["saved_bytes"])
    report = (tmp_path / "speed.md").read_text()
    assert report.count("| `") == 4 and "MSR over the floor: **" in report
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_saved_activation_bytes_counts_unique_storages():
    import torch

    sys.path.insert(0, str(BENCH))
    from speed import saved_activation_bytes

    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(16, 64)

    def fn():
        h = x @ w  # saves x (4 KiB) and w (a parameter, excluded)
        (h * h).sum()  # saves h once (4 KiB) though it is used twice

    assert saved_activation_bytes(fn, [w]) == 2 * 16 * 64 * 4


def test_accuracy_method_options_reach_the_run():
    """The ablation's options change what is trained: callback arguments, data-dependent scaling, param groups."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        from _accuracy_models import build, load_digits_task, parse_method
        from accuracy import Classifier
    finally:
        sys.path.remove(str(BENCH))
    from lightning_msr import MeanShiftRejection
    from lightning_msr.functional import mean_shift

    task = load_digits_task(max_train=256)
    spec = parse_method("msr[init_magnitude=1.414,keep_magnitude=true,clip=0.3,conv_lr=6,lsuv=1]")
    model, callbacks, overrides = build(spec, task, seed=0)
    (msr,) = callbacks
    assert isinstance(msr, MeanShiftRejection) and "keep_magnitude=True" in repr(msr)
    assert overrides == {"clip": 0.3, "conv_lr": 6.0}
    # lsuv: zero-mean kernels whose outputs have unit RMS on the training images, layer by layer
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    outputs = []
    handles = [c.register_forward_hook(lambda m, i, o: outputs.append(o)) for c in convs]
    with torch.no_grad():
        model(task.x_train)
    for h in handles:
        h.remove()
    for conv, out in zip(convs, outputs):
        assert float(mean_shift(conv.weight, mode=DEFAULT_MODE)) < 1e-5
        assert float(out.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=0.15)
    opt = Classifier(model, lr=0.1, total_steps=10, conv_lr=6.0).configure_optimizers()["optimizer"]
    lrs = {len(g["params"]): g["lr"] for g in opt.param_groups}
    assert lrs == {len(convs): pytest.approx(0.6), sum(1 for _ in model.parameters()) - len(convs): 0.1}
    with pytest.raises(ValueError, match="Expected `keep_magnitude` to be one of"):
        parse_method("msr[keep_magnitude=maybe]")


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


def _bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import _accuracy_models
        import accuracy
    finally:
        sys.path.remove(str(BENCH))
    return _accuracy_models, accuracy


def _write_idx(path: Path, array) -> None:
    """An idx file as the Fashion-MNIST distribution ships it: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes."""
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype("uint8").tobytes())


def _tiny_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20):
    """The four idx.gz files of a tiny 28x28 data set (like Debian's folder); returns the arrays written."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def test_fashion_mnist_loader_reads_the_idx_files_through_torchvision(tmp_path):
    import torch

    models, _ = _bench_modules()
    arrays = _tiny_fashion_mnist(tmp_path / "package")
    cache = tmp_path / "cache"
    task = models.load_fashion_mnist_task(data_dir=tmp_path / "package", cache_dir=cache)
    # unpacked once into the layout torchvision expects
    assert sorted(p.name for p in (cache / "FashionMNIST" / "raw").iterdir()) == sorted(models.FASHION_MNIST_FILES)
    assert task.x_train.shape == (40, 1, 28, 28) and task.x_test.shape == (20, 1, 28, 28)
    images, labels = arrays["train"]
    expected = (torch.from_numpy(images).float() / 255 - models.FASHION_MNIST_MEAN) / models.FASHION_MNIST_STD
    torch.testing.assert_close(task.x_train[:, 0], expected)
    assert task.y_train.tolist() == labels.tolist()
    assert task.y_test.tolist() == arrays["t10k"][1].tolist()
    assert task.augment > 0 and task.num_classes == 10
    # a fixed subset, the same on every call; the cache (a torchvision root) is accepted as --data-dir too
    a = models.load_fashion_mnist_task(train_size=10, test_size=5, data_dir=cache, cache_dir=tmp_path / "unused")
    b = models.load_fashion_mnist_task(train_size=10, test_size=5, data_dir=tmp_path / "package", cache_dir=cache)
    assert len(a.y_train) == 10 and len(a.y_test) == 5
    torch.testing.assert_close(a.x_train, b.x_train)
    assert not (tmp_path / "unused").exists()


def test_fashion_mnist_cache_is_prepared_by_sweeps_started_together(tmp_path):
    """Two sweeps started at once unpack the same files into the cache: each writes a file of its own and renames
    it, so both succeed (one shared temporary name failed the second with FileNotFoundError) and no partial file is
    left behind."""
    import subprocess
    import time

    _tiny_fashion_mnist(tmp_path / "package", n_train=400)
    cache, go = tmp_path / "cache", tmp_path / "go"
    # every process waits for `go` after its imports, and each copy takes a while: the unpacking overlaps
    code = (
        "import sys, time, shutil; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "import _accuracy_models as m; copy = shutil.copyfileobj; "
        "shutil.copyfileobj = lambda *a, **k: (time.sleep(0.3), copy(*a, **k)); "
        "Path(sys.argv[4] + '.' + sys.argv[5]).touch()\n"
        "while not Path(sys.argv[4]).exists(): time.sleep(0.01)\n"
        "m.prepare_fashion_mnist_root(Path(sys.argv[2]), Path(sys.argv[3]))"
    )
    args = [str(BENCH), str(tmp_path / "package"), str(cache), str(go)]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args, str(i)]) for i in range(4)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"go.{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    models, _ = _bench_modules()
    raw = cache / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(models.FASHION_MNIST_FILES)
    assert models.load_fashion_mnist_task(data_dir=cache, cache_dir=tmp_path / "unused").x_train.shape[0] == 400


def test_fashion_mnist_missing_data_says_both_ways_to_get_it(tmp_path, monkeypatch):
    models, _ = _bench_modules()
    monkeypatch.setattr(models, "FASHION_MNIST_PACKAGE_DIR", tmp_path / "not-installed")
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist.*`--download`"):
        models.fashion_mnist_root(cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="Expected `--data-dir` to hold the four Fashion-MNIST idx files"):
        models.fashion_mnist_root(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    # with downloads allowed, torchvision downloads into the cache dir
    assert models.fashion_mnist_root(cache_dir=tmp_path / "cache", download=True) == tmp_path / "cache"


def test_accuracy_fashion_mnist_tiny_run_on_both_networks(tmp_path):
    _tiny_fashion_mnist(tmp_path / "package")
    args = ["--tiny", "--out", str(tmp_path), "--no-progress-bar", "--dataset", "fashion_mnist"]
    args += ["--data-dir", str(tmp_path / "package"), "--cache-dir", str(tmp_path / "cache")]
    args += ["--arch", "vgg", "resnet20", "--batch-sizes", "8", "--lrs", "0.05", "--seeds", "0"]
    methods = ["batchnorm", "groupnorm", "frn", "msr_replace_noise"]
    assert "8 to run" in _run("accuracy.py", *args, "--methods", *methods)
    rows = _rows(tmp_path / "accuracy.csv")
    assert {(r["arch"], r["method"]) for r in rows} == {(a, m) for a in ("vgg", "resnet20") for m in methods}
    for r in rows:
        assert r["dataset"] == "fashion_mnist" and r["n_train"] == "40" and r["n_test"] == "20"
        assert int(r["steps"]) == 2 * 5  # 2 epochs of 40 images at batch 8
        # the MSR row starts from the BatchNorm network; the callback replaced every BatchNorm
        assert int(r["norm_layers"]) == (r["method"] != "msr_replace_noise")
    md = (tmp_path / "accuracy.md").read_text()
    assert "## fashion_mnist, resnet20, 40 train images" in md and "## fashion_mnist, vgg, 40 train images" in md
    # resumable; the second stage adds seed 1 at the best LR of each finished sweep (one LR here)
    out = _run("accuracy.py", *args, "--methods", *methods, "--no-report", "--best-lr-seeds", "1")
    assert "0 to run" in out and "8 configurations, 0 already in" in out
    assert sorted(r["seed"] for r in _rows(tmp_path / "accuracy.csv")) == ["0"] * 8 + ["1"] * 8


def test_accuracy_fashion_mnist_without_data_fails_clearly(tmp_path):
    args = ["--tiny", "--out", str(tmp_path), "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "none")]
    assert "Expected `--data-dir` to hold the four Fashion-MNIST idx files" in _fail("accuracy.py", *args)
    assert not (tmp_path / "accuracy.csv").exists()


# ----------------------------------------------------------------------------------------------- networks, peers


def test_filter_response_norm_matches_the_papers_formula():
    import torch

    models, _ = _bench_modules()
    frn = models.FilterResponseNorm2d(3, eps=1e-6)
    with torch.no_grad():
        frn.gamma.copy_(torch.tensor([0.5, 2.0, -1.0]))
        frn.beta.copy_(torch.tensor([0.1, -0.2, 0.3]))
        frn.tau.copy_(torch.tensor([-0.5, 0.0, 0.2]))
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    with torch.no_grad():
        out = frn(x)
    for n in range(4):
        for c in range(3):
            nu2 = float((x[n, c] ** 2).mean())
            y = frn.gamma[c].detach() * x[n, c] / (nu2 + 1e-6) ** 0.5 + frn.beta[c].detach()
            torch.testing.assert_close(out[n, c], torch.clamp(y, min=float(frn.tau[c].detach())))
    # per sample: the other images of the batch change nothing (what makes it batch-size independent)
    torch.testing.assert_close(frn(x[:1]), out[:1])
    plain = models.FilterResponseNorm2d(3, tlu=False)
    assert plain.tau is None and float(plain(x).detach().min()) < 0  # no TLU: no threshold
    assert models.has_norm_layer(torch.nn.Sequential(frn))


def test_resnet20_is_the_cifar_resnet_and_is_adopted_by_the_callback():
    import torch

    models, _ = _bench_modules()
    from lightning_msr import MeanShiftRejection, NoiseInjection

    task = models.Task(
        "t", torch.zeros(2, 1, 28, 28), torch.zeros(2).long(), torch.zeros(2, 1, 28, 28), torch.zeros(2).long(), 10
    )
    net = models.make_model("resnet20", task, "bn")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19 and sum(c.kernel_size == (1, 1) for c in convs) == 2
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 21
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # FRN + TLU replaces BatchNorm + ReLU; before the residual sum FRN has no TLU, the ReLU after the sum stays
    frn = models.make_model("resnet20", task, "frn")
    kinds = [m for m in frn.modules() if isinstance(m, models.FilterResponseNorm2d)]
    assert len(kinds) == 21 and sum(m.tlu for m in kinds) == 10
    assert sum(isinstance(m, torch.nn.ReLU) for m in frn.modules()) == 9
    gn = models.make_model("resnet20", task, "gn")
    assert [m.num_groups for m in gn.modules() if isinstance(m, torch.nn.GroupNorm)][:2] == [4, 4]
    # the MSR row builds the BatchNorm network and leaves the BatchNorm to MeanShiftRejection(batchnorm="replace")
    model, callbacks, _ = models.build(models.parse_method("msr_replace_noise"), task, seed=0, arch="resnet20")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 21
    msr, noise = callbacks
    assert isinstance(msr, MeanShiftRejection) and "batchnorm='replace'" in repr(msr)
    assert isinstance(noise, NoiseInjection)
    with pytest.raises(ValueError, match="Expected an architecture in"):
        models.make_model("resnet50", task, "bn")


def test_waves_task_is_a_seeded_1d_task_whose_label_sets_shape_and_frequency():
    import torch

    models, _ = _bench_modules()
    x, y = models.make_waves(600, seed=3)
    assert x.shape == (600, 1, models.WAVE_LENGTH) and y.shape == (600,)
    assert set(y.tolist()) == set(range(models.WAVE_CLASSES))
    again, y_again = models.make_waves(600, seed=3)
    assert torch.equal(x, again) and torch.equal(y, y_again)
    assert not torch.equal(x, models.make_waves(600, seed=4)[0])
    # the class is in the signal: the dominant frequency rises with the band (y % 6), whatever the noise
    spectrum = torch.fft.rfft(x[:, 0] - x[:, 0].mean(1, keepdim=True)).abs()
    peak = spectrum[:, 1:20].argmax(1).float() + 1
    band_means = [peak[(y % 6) == band].mean().item() for band in range(6)]
    assert band_means == sorted(band_means) and band_means[-1] - band_means[0] > 2.5
    task = models.load_waves_task(n_train=40, n_test=20)
    assert task.x_train.shape == (40, 1, 128) and task.x_test.shape == (20, 1, 128) and task.augment == 0


def test_cnn1d_is_a_conv1d_batchnorm1d_net_adopted_by_the_callback_and_refused_on_images():
    import torch

    from lightning_msr import MeanShiftRejection

    models, _ = _bench_modules()
    task = models.load_waves_task(n_train=8, n_test=4)
    net = models.make_model("cnn1d", task, "bn")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64] and all(c.kernel_size == (5,) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 4
    assert net(task.x_train).shape == (8, 12)
    ws = models.make_model("cnn1d", task, "gnws")  # Weight Standardization reaches the 1-D convs too
    weight = [m for m in ws.modules() if isinstance(m, torch.nn.Conv1d)][1].weight.flatten(1)
    assert torch.allclose(weight.mean(1), torch.zeros(32), atol=1e-5)
    _, callbacks, _ = models.build(models.parse_method("msr_replace_noise"), task, seed=0, arch="cnn1d")
    assert isinstance(callbacks[0], MeanShiftRejection)
    with pytest.raises(ValueError, match=r"Expected an architecture in \('cnn1d',\) for the 1-D task 'waves'"):
        models.make_model("resnet8", task, "bn")
    image = models.Task(
        "img", torch.zeros(2, 1, 8, 8), torch.zeros(2).long(), torch.zeros(2, 1, 8, 8), torch.zeros(2).long(), 10
    )
    with pytest.raises(ValueError, match="for the 2-D task 'img', but got 'cnn1d'"):
        models.make_model("cnn1d", image, "bn")


def test_accuracy_waves_tiny_run_replaces_batchnorm1d(tmp_path):
    _run(
        "accuracy.py",
        "--tiny",
        "--dataset",
        "waves",
        "--arch",
        "cnn1d",
        "--methods",
        "batchnorm",
        "msr_replace_noise",
        "--batch-sizes",
        "8",
        "--lrs",
        "0.05",
        "--seeds",
        "0",
        "--out",
        str(tmp_path),
        "--no-progress-bar",
    )
    rows = {r["method"]: r for r in _rows(tmp_path / "accuracy.csv")}
    assert rows["batchnorm"]["arch"] == "cnn1d" and rows["batchnorm"]["dataset"] == "waves"
    assert rows["batchnorm"]["norm_layers"] == "1" and rows["msr_replace_noise"]["norm_layers"] == "0"
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 and r["diverged"] == "0" for r in rows.values())


def test_augment_batch_is_a_padded_crop_and_flip_of_each_image():
    import torch

    models, _ = _bench_modules()
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = models.augment_batch(x.repeat(16, 1, 1, 1), 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x.repeat(16, 1, 1, 1), (2,) * 4)
    seen = set()
    for i in range(len(out)):
        crops = {
            (dy, dx, f): padded[i, :, dy : dy + 6, dx : dx + 6].flip(-1)
            if f
            else padded[i, :, dy : dy + 6, dx : dx + 6]
            for dy in range(5)
            for dx in range(5)
            for f in (0, 1)
        }
        match = [k for k, c in crops.items() if torch.equal(c, out[i])]
        assert match, f"image {i} is not a crop of its padded input"
        seen.add(match[0])
    assert len(seen) > 10 and {k[2] for k in seen} == {0, 1}  # random offsets, both flips


def test_old_csv_gets_the_new_columns_without_losing_rows(tmp_path):
    _, accuracy = _bench_modules()
    old = tmp_path / "accuracy.csv"
    header = "dataset,method,batch_size,lr,seed,epochs,steps,test_acc,train_loss,diverged,seconds,norm_layers,callbacks"
    old.write_text(
        header + "\n"
        "digits,batchnorm,32,0.1,0,15,675,0.99,0.01,0,10.0,1,-\n"  # 15 epochs x ceil(1437 / 32): the full set
        "digits,msr,32,0.1,0,2,8,0.5,1.0,0,1.0,0,MeanShiftRejection\n"  # a subset run: size unknown
    )
    new = dict(accuracy.read_rows(old)[0], method="frn", n_test=360)
    accuracy.append_row(old, new)
    rows = _rows(old)
    assert list(rows[0]) == accuracy.FIELDS and len(rows) == 3
    assert [(r["arch"], r["n_train"], r["method"], r["test_acc"]) for r in rows] == [
        ("vgg", "1437", "batchnorm", "0.99"),
        ("vgg", "", "msr", "0.5"),
        ("vgg", "1437", "frn", "0.99"),
    ]
    # the upgraded row keeps its key: a resumed sweep does not run it again
    assert accuracy._key(accuracy.read_rows(old)[0]) == ("digits", "vgg", 1437, "batchnorm", 32, 0.1, 0, 15)


def test_unit_clip_and_the_calibration_options_reach_the_run():
    import torch

    models, accuracy = _bench_modules()
    from lightning_msr import MeanShiftRejection

    task = models.load_digits_task(max_train=64)
    spec = models.parse_method("msr_replace_noise[calibrate=false,residual_scale=1,adaptive_clip=none]")
    (msr, _) = models.build(spec, task, seed=0)[1]
    assert isinstance(msr, MeanShiftRejection)
    assert "calibrate=False" in repr(msr) and "residual_scale=1.0" in repr(msr) and "adaptive_clip=None" in repr(msr)
    # unit_clip: the Classifier clips (lightning_msr.functional.adaptive_clip_) before every optimizer step,
    # every parameter but the classifier layer's
    model, _, overrides = models.build(models.parse_method("batchnorm[unit_clip=0.02]"), task, seed=0)
    assert overrides == {"unit_clip": 0.02}
    module = accuracy.Classifier(model, lr=0.1, total_steps=1, unit_clip=overrides["unit_clip"])
    for p in model.parameters():
        p.grad = torch.full_like(p, 100.0)
    module.on_before_optimizer_step(None)
    conv, head = model[0], model[-1]
    w_norm = conv.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(conv.weight.grad.flatten(1).norm(dim=1), 0.02 * w_norm)
    assert torch.equal(head.weight.grad, torch.full_like(head.weight, 100.0))


def test_nesterov_option_reaches_the_optimizer():
    models, accuracy = _bench_modules()
    task = models.load_digits_task(max_train=64)
    for name, expected in (("batchnorm[nesterov=1,warmup=0.3]", True), ("batchnorm", False)):
        model, _, overrides = models.build(models.parse_method(name), task, seed=0)
        module = accuracy.Classifier(
            model, lr=0.1, total_steps=10, nesterov=overrides.get("nesterov", False), warmup=overrides.get("warmup", 0)
        )
        optimizer = module.configure_optimizers()["optimizer"]
        assert all(group["nesterov"] is expected for group in optimizer.param_groups)
        assert module.warmup_steps == (3 if expected else 0)


def test_deep_control_option_trains_the_users_path_deep_control_then_msr():
    """`deep_control=1`: `DeepControl()` goes first, on the BatchNorm network, so the trained network has Deep
    Control's gain controls where BatchNorm was and MSR's folded scales; anything but a BatchNorm network refuses."""
    import torch

    models, accuracy = _bench_modules()
    from lightning_msr import DeepControl, MeanShiftRejection, NoiseInjection
    from lightning_msr.nn import AutomaticGainControl

    task = models.load_digits_task(max_train=32)
    model, callbacks, _ = models.build(models.parse_method("msr_replace_noise[deep_control=1]"), task, seed=0)
    assert [type(c) for c in callbacks] == [DeepControl, MeanShiftRejection, NoiseInjection]
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert batchnorms > 0
    module = accuracy.Classifier(model, lr=0.05, total_steps=2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(task.x_train, task.y_train), batch_size=16)
    _two_step_trainer(callbacks).fit(module, loader)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, AutomaticGainControl) for m in model.modules()) == batchnorms
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="deep_control=1` on a BatchNorm network"):
        models.build(models.parse_method("msr[deep_control=1]"), task, seed=0)
    with pytest.raises(ValueError, match="deep_control"):
        models.parse_method("msr_replace_noise[deep_control=maybe]")


def test_best_lr_plan_adds_seeds_at_the_best_lr_of_finished_sweeps_only():
    _, accuracy = _bench_modules()
    plan = [("d", "vgg", 100, m, 32, lr, 0, 5) for m in ("a", "b") for lr in (0.1, 0.2, 0.4)]
    acc = {0.1: 0.5, 0.2: 0.9, 0.4: 0.7}
    rows = [
        dict(dataset="d", arch="vgg", n_train="100", method=m, batch_size="32", lr=str(lr), seed="0", epochs="5")
        | {"test_acc": str(acc[lr])}
        for m, lr in [("a", 0.1), ("a", 0.2), ("a", 0.4), ("b", 0.1)]  # b's sweep is unfinished
    ]
    assert accuracy.best_lr_plan(plan, rows, [1, 2]) == [("d", "vgg", 100, "a", 32, 0.2, s, 5) for s in (1, 2)]


def test_best_lr_is_chosen_on_the_sweep_seed_and_duplicate_rows_count_once():
    _, accuracy = _bench_modules()
    plan = [("d", "vgg", 100, "a", 32, lr, 0, 5) for lr in (0.1, 0.2, 0.4)]
    runs = [(0.1, 0, 0.80), (0.2, 0, 0.78), (0.4, 0, 0.70), (0.4, 0, 0.70), (0.1, 1, 0.60)]  # 0.4 recorded twice
    rows = [
        dict(dataset="d", arch="vgg", n_train="100", method="a", batch_size="32", lr=str(lr), seed=str(seed))
        | {"epochs": "5", "test_acc": str(acc)}
        for lr, seed, acc in runs
    ]
    # 0.1 won the seed-0 sweep; its low second seed does not hand the choice to an LR run once, nor does the
    # duplicated 0.4 row make that LR "the one with the most seeds"
    assert accuracy.best_lr_plan(plan, rows, [1]) == [("d", "vgg", 100, "a", 32, 0.1, 1, 5)]


def test_accuracy_summary_picks_each_methods_best_learning_rate(tmp_path):
    import csv as csv_module

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from accuracy_summary import main as summary
    finally:
        sys.path.pop(0)
    fields = ["arch", "method", "batch_size", "lr", "seed", "test_acc", "seconds"]
    rows = {
        "longrun.csv": [
            ("resnet8", "batchnorm", 128, 0.1, 0, 0.92), ("resnet8", "batchnorm", 128, 0.1, 1, 0.93),
            ("resnet8", "batchnorm", 128, 0.2, 0, 0.91), ("resnet8", "batchnorm", 128, 0.05, 0, 0.90),
            ("resnet8", "msr_replace_noise", 128, 0.2, 0, 0.90), ("resnet8", "msr_replace_noise", 128, 0.4, 0, 0.10),
        ],
        "smallbatch.csv": [("resnet20", "groupnorm", 8, 0.05, 0, 0.70), ("resnet20", "groupnorm", 8, 0.1, 0, 0.72)],
    }  # fmt: skip
    for name, values in rows.items():
        with (tmp_path / name).open("w", newline="") as fh:
            writer = csv_module.writer(fh)
            writer.writerow(fields)
            writer.writerows([(*v, 60.0) for v in values])
    out = tmp_path / "summary.md"
    assert summary(["--csv-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| BatchNorm | 92.50 ± 0.71 (lr 0.1, n=2) |" in text
    assert "| MSR defaults | 90.00 (lr 0.2, n=1, at the grid's edge) |" in text  # the best LR may lie beyond
    assert "**-2.50 points**" in text
    assert "| GroupNorm | 72.00 (lr 0.1, n=1, at the grid's edge) |" in text
    assert "Hypothesis tests" not in text  # no mechanism.csv: no section
    with (tmp_path / "mechanism.csv").open("w", newline="") as fh:
        writer = csv_module.writer(fh)
        writer.writerow(["arch", "n_train", "epochs", "method", "batch_size", "lr", "seed", "test_acc"])
        writer.writerows([
            ("resnet8", 20000, 3, "msr_replace_noise[spherical=1]", 128, lr, seed, acc)
            for lr, seed, acc in ((0.2, 0, 0.83), (0.4, 0, 0.84), (0.4, 1, 0.86), (0.8, 0, 0.81))
        ])  # fmt: skip
    assert summary(["--csv-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### resnet8, 20000 images, 3 epochs, batch 128" in text
    row = "| MSR defaults + `spherical=1` | 85.00 ± 1.41 (lr 0.4, n=2) | 0.2: 83.0 (n=1), 0.4: 85.0 (n=2), 0.8: 81.0"
    assert row in text
    assert "A 1-D task" not in text  # no waves.csv: no section
    with (tmp_path / "waves.csv").open("w", newline="") as fh:
        writer = csv_module.writer(fh)
        writer.writerow(fields)
        writer.writerows([
            ("cnn1d", method, batch, lr, seed, acc, 30.0)
            for method, batch, lr, seed, acc in (
                ("batchnorm", 64, 0.1, 0, 0.90), ("batchnorm", 64, 0.2, 0, 0.91), ("batchnorm", 64, 0.2, 1, 0.93),
                ("msr_replace_noise", 64, 0.1, 0, 0.92), ("msr_replace_noise", 1, 0.01, 0, 0.60),
            )
        ])  # fmt: skip
    assert summary(["--csv-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## A 1-D task: `waves`" in text and "| method | batch 64 | batch 1 |" in text
    assert "| BatchNorm | 92.00 ± 1.41 (lr 0.2, n=2, at the grid's edge) | -- |" in text  # no batch-1 row: --
    assert "| MSR defaults | 92.00 (lr 0.1, n=1) | 60.00 (lr 0.01, n=1) |" in text


def test_spherical_filters_step_a_virtual_weight_that_weight_decay_shrinks():
    """`spherical=1`: the forward pass keeps every folded-scale filter at its norm, the optimizer steps the virtual
    weight (its norm shrinks by `1 - lr * wd` under weight decay alone), and the gradient loses its radial part."""
    import torch
    from torch import nn

    from lightning_msr.nn import ScaledConv2d

    models, _ = _bench_modules()
    torch.manual_seed(0)
    model = nn.Sequential(ScaledConv2d(2, 3, 3))
    weight = model[0].weight
    r = weight.detach().flatten(1).norm(dim=1).clone()
    callback = models.SphericalFilters()
    optimizer = torch.optim.SGD([weight], lr=0.1, weight_decay=0.01)
    # a purely radial gradient: a scale-invariant filter would get none
    weight.grad = weight.detach().clone()
    callback.on_before_optimizer_step(None, model, optimizer)
    assert weight.grad.abs().max() < 1e-6
    optimizer.step()
    torch.testing.assert_close(weight.detach().flatten(1).norm(dim=1), r)  # the forward sees norm r
    torch.testing.assert_close(callback.state[id(weight)][1], r * (1 - 0.1 * 0.01))  # the virtual norm shrank
    # with rho below r the same tangential gradient moves the direction more, by r / rho per unit of gradient
    direction = weight.detach().clone()
    tangent = torch.randn_like(weight)
    radial = (tangent.flatten(1) * direction.flatten(1)).sum(1) / r.pow(2)
    tangent -= radial.view(-1, 1, 1, 1) * direction
    weight.grad = tangent.clone()
    callback.on_before_optimizer_step(None, model, optimizer)
    rho = callback.state[id(weight)][1]
    torch.testing.assert_close(weight.grad, tangent * (r / rho).view(-1, 1, 1, 1))


def test_scale_invariant_setting_trains_as_the_spherical_option_of_the_benchmark():
    """`MeanShiftRejection(scale_invariant=True)` is what the benchmark's `spherical=1` measured: the same weights
    within float32 rounding after 24 steps: every filter with a folded scale, the free stem's too (not centred), with
    weight decay shrinking the virtual norms."""
    import warnings

    import lightning as L
    import torch
    from torch import nn

    import lightning_msr

    models, _ = _bench_modules()

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
            )  # fmt: skip

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=0.05)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    settings = dict(batchnorm="replace", seed=0, calibration_samples=8)
    finals = {}
    for how in ("setting", "benchmark"):
        module = Module()
        if how == "setting":
            callbacks = [lightning_msr.MeanShiftRejection(scale_invariant=True, **settings)]
        else:
            msr = lightning_msr.MeanShiftRejection(implementation="eager", **settings)
            callbacks = [msr, models.SphericalFilters()]
        trainer = L.Trainer(
            max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        finals[how] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if how == "setting":
            virtual = callbacks[0].engine.state_dict()["virtual_norms"]
            assert set(virtual) == {"net.0.weight", "net.3.weight"}
            assert all(float(v.max()) < 1.0 for v in virtual.values())  # weight decay shrank them from 1
    for name, value in finals["benchmark"].items():
        torch.testing.assert_close(finals["setting"][name], value, rtol=1e-4, atol=1e-5)


def _two_step_trainer(callbacks):
    import lightning as L

    return L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip


def _fit_two_steps(models, accuracy, spec: str, lr: float):
    import torch

    task = models.load_digits_task(max_train=128)
    model, callbacks, _ = models.build(models.parse_method(spec), task, seed=0)
    module = accuracy.Classifier(model, lr=lr, total_steps=2, momentum=0.0, weight_decay=0.0)
    # the calibration pools 64 samples: the first batch, so the second step starts calibrated
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(task.x_train, task.y_train), batch_size=64)
    _two_step_trainer(callbacks).fit(module, loader)
    return model, callbacks


def test_gain_reparam_option_trains_gamma_on_top_of_the_calibrated_scale():
    """`gain_reparam=1`: once calibrated, every folded scale is split into a fixed factor (the calibrated scale)
    times a trained gamma that starts at +-1, computing the same function as the plain calibrated network."""
    import torch

    models, accuracy = _bench_modules()
    from lightning_msr.nn.scaled_conv import is_scaled_conv

    plain, _ = _fit_two_steps(models, accuracy, "msr_replace", lr=0.0)
    split, callbacks = _fit_two_steps(models, accuracy, "msr_replace[gain_reparam=1]", lr=0.0)
    assert type(callbacks[-1]).__name__ == "CalibratedGains" and callbacks[-1].done
    pairs = [(a, b) for a, b in zip(plain.modules(), split.modules()) if is_scaled_conv(a)]
    assert pairs
    for a, b in pairs:
        torch.testing.assert_close(b.scale.abs(), torch.ones_like(b.scale))
        torch.testing.assert_close(b.scale * b.gain0, a.scale)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(split.eval()(x), plain.eval()(x))


def test_keep_bn_option_holds_the_kernels_of_a_batchnorm_network_zero_mean():
    """`keep_bn=1`: the BatchNorm network keeps its BatchNorm, and MSR's zero-mean constraint is the only change."""
    import torch

    models, accuracy = _bench_modules()
    from lightning_msr.functional import mean_shift

    model, (msr,) = _fit_two_steps(models, accuracy, "msr_replace[keep_bn=1]", lr=0.1)
    assert "calibrate=False" in repr(msr) and "adaptive_clip=None" in repr(msr)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(float(mean_shift(c.weight, mode=DEFAULT_MODE)) < 1e-5 for c in convs[1:])  # the stem stays free
