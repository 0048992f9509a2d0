"""lightning_msr.calibration: BatchNorm's signal at initialisation, residual branches, the first-batch check."""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import pytest
import torch
import torchvision
from helpers import DEFAULT_MODE, ConvNet, WeightRecorder, loader, trainer
from torch import nn

import lightning_msr
from lightning_msr import MeanShiftRejection, MSRConfigurationError, MSRWarning, replace_batchnorm
from lightning_msr.calibration import calibrate, gain_sites, residual_branch_ends, watch_signal
from lightning_msr.functional import adaptive_clip_, eligible_weights, mean_shift, zero_mean_init_
from lightning_msr.nn import AutomaticGainControl
from lightning_msr.nn.affine import ChannelAffine


def _zero_mean(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for w in eligible_weights(model):
        if w.centrable:
            zero_mean_init_(w.parameter, 1.0, generator, **w.layout_kwargs())


def _smooth_images(n: int = 8, size: int = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Low-frequency images (a blurred random field plus an offset), on which zero-mean kernels pass little."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size // 4, size // 4, generator=g)
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False) + 2.0


def _stack(depth: int, gains: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, 8, 3, bias=not gains)]
        if gains:
            layers.append(ChannelAffine(8))
        layers.append(nn.ReLU())
        cin = 8
    return nn.Sequential(*layers)


@pytest.mark.parametrize("gains", [False, True])
def test_calibration_gives_every_layer_batchnorm_statistics(gains):
    torch.manual_seed(0)
    net = _stack(6, gains)
    _zero_mean(net)
    x = _smooth_images()
    with torch.no_grad():
        before = net(x)
        with calibrate(net) as report:
            during = net(x)
        after = net(x)
    assert before.std() < 0.1  # zero-mean kernels of unit norm on smooth images pass little of the signal
    torch.testing.assert_close(during, after)  # the pass itself already used the calibrated parameters
    sites = [f"{i}" for i, m in enumerate(net) if isinstance(m, (nn.Conv2d, ChannelAffine))]
    assert report.calibrated == sites
    pre_activation = net[:-1](x)  # the last conv's (or gain's) output, before the ReLU
    std = pre_activation.std(dim=(0, 2, 3))
    mean = pre_activation.mean(dim=(0, 2, 3))
    torch.testing.assert_close(std, torch.ones_like(std), rtol=0.2, atol=0.0)  # shrunk towards the layer's std
    # each channel's mean is shrunk towards its layer's by 64 / (n + 64) of the way: near 0, not exactly
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0.0, atol=1e-3)
    for conv in (m for m in net if isinstance(m, nn.Conv2d)):  # filters were only scaled
        assert float(mean_shift(conv.weight, mode=DEFAULT_MODE)) < 1e-6
    if gains:  # the scale went into the filters; the fresh gains stay at BatchNorm's 1
        for gain in (m for m in net if isinstance(m, ChannelAffine)):
            torch.testing.assert_close(gain.weight, torch.ones(8), rtol=0.05, atol=0.0)


def test_calibration_pass_gives_exact_gradients():
    torch.manual_seed(0)
    net = _stack(3, gains=True)
    _zero_mean(net)
    x = _smooth_images()
    with calibrate(net):
        net(x).square().mean().backward()
    first = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net(x).square().mean().backward()
    for name, param in net.named_parameters():
        torch.testing.assert_close(first[name], param.grad, msg=name)


def test_zero_scale_stays_zero_and_deep_control_is_corrected():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), AutomaticGainControl(4), nn.ReLU(), nn.Conv2d(4, 4, 3), ChannelAffine(4))
    _zero_mean(net)
    with torch.no_grad():
        net[4].weight[1] = 0.0  # e.g. zero_init_residual
        with calibrate(net) as report:
            y = net(_smooth_images())
    assert report.calibrated == ["0", "1", "3", "4"]
    assert float(net[4].weight[1].detach()) == 0.0
    kept = y[:, [0, 2, 3]].std(dim=(0, 2, 3))
    torch.testing.assert_close(kept, torch.ones(3), rtol=0.2, atol=0.0)
    # the mean subtraction of Deep Control removed part of the signal; its gain put it back
    agc_out = net[:2](_smooth_images())
    assert 0.8 < float(agc_out.std(dim=(0, 2, 3)).mean()) < 1.2


def test_reduce_sums_statistics_over_processes():
    torch.manual_seed(0)
    a = _stack(3, gains=True)
    _zero_mean(a)
    b = copy.deepcopy(a)
    x = _smooth_images()
    with torch.no_grad():
        with calibrate(a, reduce=lambda t: t * 2):  # "two ranks with the same batch"
            a(x)
        with calibrate(b):
            b(torch.cat([x, x]))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_tiny_maps_are_calibrated_from_their_layer():
    """A 1x1 map at batch 2 has 2 values per channel: its channels are normalised with the layer's statistics
    (pooled over channels), not left alone and not fitted to two samples each."""
    gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 16, 1))
    _zero_mean(gate)
    with torch.no_grad(), calibrate(gate) as report:
        y = gate(_smooth_images(n=2))
    assert report.calibrated == ["1"] and not report.failed
    assert 0.5 < float(y.std()) < 2.0  # the layer's spread, not 2 values per channel stretched to std 1


def test_convs_no_normalisation_follows_are_kept_in_a_normalised_model():
    """A squeeze-and-excitation gate of a BatchNorm model had no BatchNorm: its convs keep their drawn scale."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            return y * torch.sigmoid(self.se(y))

    net = Gated()
    replace_batchnorm(net, "fold")
    _zero_mean(net)
    before = {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "se" in n}
    assert gain_sites(net) == {"conv": "weight", "se.1": "kept", "se.3": "kept"}
    with torch.no_grad(), calibrate(net) as report:
        net(_smooth_images())
    assert report.calibrated == ["conv"] and set(report.kept) == {"se.1", "se.3"}
    for name, weight in before.items():
        torch.testing.assert_close(net.get_submodule(name).weight, weight, rtol=0, atol=0)


def test_statistics_pool_over_passes_like_one_large_batch():
    """With one site (a conv with BatchNorm folded into it: nothing upstream changes between passes) pooling 4
    batches of 4 gives the calibration of one batch of 16; passes after ``samples`` is reached change nothing."""
    x = _smooth_images(n=16)
    nets = []
    for chunks in (1, 4):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        replace_batchnorm(net, "fold")
        _zero_mean(net)
        with torch.no_grad(), calibrate(net, samples=16) as report:
            for part in x.chunk(chunks):
                net(part)
            assert report.complete and report.samples == 16 and report.passes == chunks
            frozen = copy.deepcopy(net)
            net(x[:3])  # a pass after the last one
        for p, q in zip(net.parameters(), frozen.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        nets.append(net)
    for p, q in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(p, q)


def test_samples_must_be_a_positive_integer():
    with pytest.raises(MSRConfigurationError, match="Expected `samples` to be an integer >= 1, but got 0"):
        with calibrate(nn.Conv2d(1, 1, 3), samples=0):
            pass


def test_msr_calibrates_at_batch_one_over_the_first_batches(tmp_path):
    """Batch size 1: the calibration pools ``calibration_samples`` batches, every layer is calibrated (1x1 and 2x2
    maps included) and the signal reaching the classifier on a batch it did not see is BatchNorm's to within 3x."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = nn.functional.interpolate(torch.randn(40, 3, 8, 8, generator=g), size=64, mode="bilinear")
    head = net.classifier[0]
    seen: list[float] = []
    handle = head.register_forward_hook(lambda m, a, o: seen.append(float(a[0].double().square().mean().sqrt())))
    with torch.no_grad():
        net.train()(x[32:])
    batchnorm = seen.pop()

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean() * 0.0  # calibration only: the weights do not move

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    msr = MeanShiftRejection(batchnorm="replace", calibration_samples=16)
    data = torch.utils.data.TensorDataset(x[:17], torch.zeros(17))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_steps=17, callbacks=[msr]).fit(Model(), torch.utils.data.DataLoader(data, batch_size=1))
    report = msr.engine.calibration
    assert report.complete and report.passes == 16 and not report.failed
    assert len(report.calibrated) == len([n for n, k in gain_sites(net).items() if k != "kept"])
    seen.clear()
    with torch.no_grad():
        net.train()(x[32:])
    handle.remove()
    assert 1 / 3 < seen[0] / batchnorm < 3, (seen[0], batchnorm)


def test_a_layer_without_signal_is_reported():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), AutomaticGainControl(4))
    _zero_mean(net)
    with torch.no_grad(), calibrate(net) as report:  # zero-mean kernels on constant images: nothing passes
        net(torch.ones(16, 3, 8, 8))
    assert "0" in report.failed and "constant" in report.failed["0"]


@pytest.mark.parametrize("fold", [False, True])
def test_a_gain_control_on_single_element_maps_keeps_the_signal(fold):
    """A 1x1 map's mean is the map: with beta = 1 Deep Control would remove all of it, so calibration sets beta to 0
    for that gain control (and says so) and normalises what passes."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    replace_batchnorm(net, "agc_fold" if fold else "agc")
    with torch.no_grad(), calibrate(net) as report:  # 3x3 input, 3x3 kernel: 1x1 maps
        y = net(torch.randn(16, 3, 3, 3))
    site = "0" if fold else "1"
    assert site in report.adjusted and "beta set to 0" in report.adjusted[site] and not report.failed
    assert float(net[1].beta.abs().max()) == 0.0
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(4), rtol=0.3, atol=0.0)


def _resnet_ends(model: nn.Module) -> list[str]:
    ends = []
    for name, module in model.named_modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            ends.append(f"{name}.bn3")
        elif isinstance(module, torchvision.models.resnet.BasicBlock):
            ends.append(f"{name}.bn2")
    return ends


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_residual_branch_ends_are_what_zero_init_residual_zeroes(arch):
    net = torchvision.models.get_model(arch, num_classes=10)
    expected = _resnet_ends(net)
    replace_batchnorm(net)
    assert residual_branch_ends(net) == expected
    sites = gain_sites(net)
    assert sites["layer1.0.bn2" if arch == "resnet18" else "layer1.0.bn3"] == "gain, residual"
    assert sites["layer1.0.downsample.1" if arch == "resnet50" else "bn1"] == "gain"  # shortcuts and the stem


def test_inverted_residuals_and_normaliser_free_branches():
    net = torchvision.models.mobilenet_v2(num_classes=10)
    replace_batchnorm(net)
    ends = residual_branch_ends(net)
    with_shortcut = [n for n, m in net.named_modules() if getattr(m, "use_res_connect", False)]
    assert ends == [f"{n}.conv.3" for n in with_shortcut]

    class Free(nn.Module):  # no gain layers at all: the conv ending the branch is the site
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + nn.functional.dropout(self.b(torch.relu(self.a(x))), 0.1, self.training)

    assert residual_branch_ends(nn.Sequential(nn.Conv2d(3, 4, 1), Free())) == ["1.b"]


def test_untraceable_models_are_traced_by_parts():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torchvision.models.resnet18(num_classes=10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this module
                x = x * 1.0
            return self.body(x)

    net = Untraceable()
    replace_batchnorm(net)
    assert residual_branch_ends(net) == ["body." + n for n in _resnet_ends(net.body)]


def test_residual_scale_sets_the_branch_end():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    replace_batchnorm(net)
    _zero_mean(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), calibrate(net, residual_scale=0.0) as report:
        net(x)
    assert report.residual == _resnet_ends(net) and set(report.residual) <= set(report.calibrated)
    assert all(float(net.get_submodule(n).weight.abs().max()) == 0.0 for n in report.residual)
    with pytest.raises(MSRConfigurationError, match="Expected `residual_scale` to be in \\[0, 1\\]"):
        with calibrate(net, residual_scale=2.0):
            pass


def _vanishing(depth: int = 4) -> nn.Sequential:
    """A conv stack whose weights shrink the signal 100x per layer (from the second layer on)."""
    torch.manual_seed(0)
    net = _stack(depth, gains=False)
    with torch.no_grad():
        for conv in list(net)[2::2]:
            conv.weight.mul_(1e-2)
            conv.bias.zero_()
    return net


def test_watch_signal_names_where_it_vanishes():
    net = _vanishing()
    with torch.no_grad(), watch_signal(net) as report:
        net(_smooth_images())
    assert report.signal_problem() == ("2", report.rms["2"], "vanishes")  # the second conv: 1e-2 x 5e-2


# ----------------------------------------------------------------------------------------------- the callback
def test_callback_calibrates_once_on_the_first_batch(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    callback = MeanShiftRejection(adaptive_clip=None)
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=2, callbacks=[callback, recorder]).fit(model, loader(16, batch_size=8))
    calibrated = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = model.features[0].weight.flatten(1).norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))  # the filters carry the calibrated scale
    assert float(callback.current_mean_shift()) < 1e-5
    # a second fit of the same model neither redraws nor recalibrates
    trainer(tmp_path, max_steps=0, callbacks=[callback]).fit(model, loader(16, batch_size=8))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, calibrated[name], rtol=0, atol=0)


def test_callback_warns_about_a_vanishing_signal_it_did_not_calibrate(tmp_path):
    class Deep(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(_vanishing(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(_smooth_images(16), torch.randint(0, 3, (16,)))
    with pytest.warns(MSRWarning, match=r"the signal vanishes at 'net\.0\.2'.*`calibrate=True`"):
        trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(init="none")]).fit(
            Deep(), torch.utils.data.DataLoader(data, batch_size=8)
        )


@pytest.mark.free_stem  # the real default for the stem: the paper's argument set must include it
def test_paper_settings_are_reachable(tmp_path):
    """The paper's method exactly: every conv (the stem too) unit-norm and zero-mean, projected gradients,
    nothing else."""
    L.seed_everything(0)
    model = ConvNet("sgd_momentum")
    recorder = WeightRecorder()
    paper = MeanShiftRejection(init_magnitude=1.0, calibrate=False, adaptive_clip=None, include_stem=True)
    trainer(tmp_path, max_steps=1, callbacks=[paper, recorder]).fit(model, loader(8, batch_size=8))
    assert len(paper.weights) == len(eligible_weights(model))
    first = recorder.at_fit_start["features.0.weight"]
    torch.testing.assert_close(first.flatten(1).norm(dim=1), torch.ones(8))
    assert max(float(mean_shift(w.parameter, mode=DEFAULT_MODE, **w.layout_kwargs())) for w in paper.weights) < 1e-5


def test_adaptive_clip_bounds_every_unit_and_keeps_zero_mean():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 3, 3, 3))
    w.grad = torch.randn(6, 3, 3, 3) * torch.tensor([100.0, 1e-3, 100.0, 1e-3, 100.0, 1e-3]).view(-1, 1, 1, 1)
    w.grad -= w.grad.mean(dim=(2, 3), keepdim=True)
    gain = nn.Parameter(torch.tensor([1.0, 0.0]))
    gain.grad = torch.tensor([5.0, 5.0])
    before = w.grad.clone()
    adaptive_clip_([w, gain], clip=0.1)
    ratio = w.grad.flatten(1).norm(dim=1) / w.detach().flatten(1).norm(dim=1)
    assert bool((ratio <= 0.1 + 1e-6).all())
    torch.testing.assert_close(w.grad[1::2], before[1::2])  # small gradients untouched
    assert float(w.grad.mean(dim=(2, 3)).abs().max()) < 1e-6
    torch.testing.assert_close(gain.grad, torch.tensor([0.1, 1e-4]))  # a zero gain still moves (eps)
    with pytest.raises(MSRConfigurationError, match="Expected `clip` to be a finite positive number"):
        adaptive_clip_([w], clip=0.0)


def test_adaptive_clip_in_the_callback(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd")
    recorder = WeightRecorder()
    trainer(tmp_path, max_steps=1, callbacks=[MeanShiftRejection(adaptive_clip=1e-3), recorder]).fit(
        model, loader(8, batch_size=8)
    )
    grad = recorder.grads[0]["features.0.weight"]
    weight = model.features[0].weight.detach()  # after a step of at most lr * 1e-3 of its norm
    assert bool((grad.flatten(1).norm(dim=1) <= 1e-3 * weight.flatten(1).norm(dim=1) * (1 + 1e-3)).all())
    head = recorder.grads[0]["head.weight"]  # a Linear is clipped row by row like a filter
    assert bool((head.norm(dim=1) <= 1e-3 * model.head.weight.detach().norm(dim=1) * (1 + 1e-2)).all())
    with pytest.raises(MSRConfigurationError, match="adaptive_clip"):
        MeanShiftRejection(adaptive_clip=-1.0)


class _BeforeStep(L.Callback):
    """The parameters and gradients the optimizer step is about to use (after the callbacks before this one)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not hasattr(self, "params"):
            named = list(pl_module.named_parameters())
            self.params = {n: p.detach().clone() for n, p in named}
            self.grads = {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


@pytest.mark.parametrize("batchnorm", ["replace", "affine"])
def test_adaptive_clip_bounds_gains_and_offsets(tmp_path, batchnorm):
    """The per-channel scales that replaced BatchNorm are clipped relative to their size, the biases relative to
    max(|b|, 1) (the calibrated signal's unit), so neither can blow a deep network up once calibrated."""
    L.seed_everything(0)
    model = ConvNet("sgd", batchnorm=True)
    seen = _BeforeStep()
    msr = MeanShiftRejection(batchnorm=batchnorm, adaptive_clip=1e-3)
    trainer(tmp_path, max_steps=1, callbacks=[msr, seen]).fit(model, loader(8, batch_size=8))
    scale = "features.0.scale" if batchnorm == "replace" else "features.1.weight"
    offsets = ["features.4.bias", "head.bias", "features.0.bias" if batchnorm == "replace" else "features.1.bias"]
    for name in [scale, *offsets]:
        grad, value = seen.grads[name], seen.params[name]
        floor = 1e-3 if name == scale else 1.0
        assert bool((grad.abs() <= 1e-3 * value.abs().clamp(min=floor) * (1 + 1e-2)).all()), name
        assert float(grad.abs().max()) > 0  # clipped, not zeroed


class _FirstForward(L.Callback):
    """The parameters as the first training forward left them (after any calibration in it)."""

    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not self.params:
            self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("with_msr_state", [True, False])
def test_a_resumed_fit_is_never_recalibrated(tmp_path, with_msr_state):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # the calibration completes in the first run (a checkpoint taken while it pools goes on pooling: see below)
    first = [MeanShiftRejection(calibration_samples=4), ckpt] if with_msr_state else [ckpt]
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=first).fit(ConvNet(), loader(16))
    saved = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
    L.seed_everything(1)
    seen = _FirstForward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without MSR state: the "not zero-mean" warning of a foreign checkpoint
        resumed = trainer(tmp_path, max_epochs=2, callbacks=[MeanShiftRejection(), seen])
        resumed.fit(ConvNet(), loader(16), ckpt_path=ckpt.last_model_path)
    for name, value in saved.items():
        torch.testing.assert_close(seen.params[name], value, rtol=0, atol=0, msg=name)


def test_a_fit_resumed_while_the_calibration_pools_goes_on_pooling(tmp_path):
    """A checkpoint saved before ``calibration_samples`` were seen holds the pooled statistics; the resumed fit
    pools the rest and ends with the weights of the uninterrupted fit, bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root, epochs, ckpt_path=None, callbacks=()):
        msr = MeanShiftRejection(batchnorm="replace", calibration_samples=48)  # 6 batches of 8: 4 per epoch
        model = ConvNet("sgd_momentum", batchnorm=True)
        trainer(root, max_epochs=epochs, enable_checkpointing=bool(callbacks), callbacks=[msr, *callbacks]).fit(
            model, loader(32, batch_size=8), ckpt_path=ckpt_path
        )
        return model, msr

    L.seed_everything(0)
    straight, _ = fit(tmp_path / "a", 2)
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "b", 1, callbacks=[checkpoint])
    saved = torch.load(checkpoint.last_model_path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("MeanShiftRejection")]
    assert state["calibration"]["passes"] == 4 and not state["calibration"]["complete"]
    L.seed_everything(0)
    resumed, msr = fit(tmp_path / "c", 2, ckpt_path=checkpoint.last_model_path)
    report = msr.engine.calibration
    assert report.complete and report.passes == 6 and report.samples == 48
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _DeepResNet(L.LightningModule):
    def __init__(self, branches: int) -> None:
        super().__init__()
        stem = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        blocks = [_Block(16) for _ in range(branches)]
        self.net = nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.losses: list[float] = []
        self.head_rms: list[float] = []
        self.net[-1].register_forward_hook(lambda m, a, o: self.head_rms.append(float(a[0].square().mean().sqrt())))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.slow
def test_fifty_residual_branches_are_as_stable_as_nine(tmp_path):
    """The same block stacked 9 and 50 times in one stage (nothing renormalises the residual stream), adopted with
    the defaults at batch 2 and lr 0.1: both train finite, with comparable losses, and the signal reaching the
    classifier after the calibrating batches is of the same order at either depth -- BatchNorm's own stream grows
    with the number of branches instead (2.5x from 9 to 50 here)."""
    g = torch.Generator().manual_seed(0)
    x = nn.functional.interpolate(torch.randn(96, 3, 4, 4, generator=g), size=16, mode="bilinear")
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (96,), generator=g))
    largest, signal = {}, {}
    for branches in (9, 50):
        torch.manual_seed(0)
        model = _DeepResNet(branches)
        with torch.no_grad():
            model.net.train()(x[:2])
        batchnorm = model.head_rms.pop()
        callbacks = [MeanShiftRejection(batchnorm="replace"), lightning_msr.NoiseInjection()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loader_ = torch.utils.data.DataLoader(data, batch_size=2)
            trainer(tmp_path, max_steps=40, callbacks=callbacks).fit(model, loader_)
        assert all(math.isfinite(v) for v in model.losses), (branches, model.losses)
        largest[branches], signal[branches] = max(model.losses), model.head_rms[32]  # 32 calibrating batches
        if branches == 9:
            assert 0.1 < signal[9] / batchnorm < 10, (signal[9], batchnorm)
    assert largest[50] < 10 * largest[9], largest
    assert 0.1 < signal[50] / signal[9] < 10, signal


def test_adaptive_clip_leaves_excluded_layers_alone(tmp_path):
    L.seed_everything(0)
    model = ConvNet("sgd", batchnorm=True)
    seen = _BeforeStep()
    msr = MeanShiftRejection(batchnorm="replace", adaptive_clip=1e-3, exclude=["head"])
    trainer(tmp_path, max_steps=1, callbacks=[msr, seen]).fit(model, loader(8, batch_size=8))
    for name in ("head.weight", "head.bias"):  # excluded: larger than the clip would allow
        grad, value = seen.grads[name], seen.params[name]
        assert float(grad.abs().max()) > 1e-3 * float(value.abs().clamp(min=1.0).max()), name
