"""Tests of replace_batchnorm: any module tree, the root too, idempotent, refuses wrapped models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchvision.models import mobilenet_v2, mobilenet_v3_small, resnet18

from lightning_msr import MSRConfigurationError, MSRWarning, merge_scaled_convs, replace_batchnorm
from lightning_msr.nn import AutomaticGainControl, ScaledConv1d, ScaledConv2d
from lightning_msr.nn.affine import ChannelAffine
from lightning_msr.surgery import Replacements, find_batchnorm, find_foldable_pairs

NEW_TYPE = {"affine": ChannelAffine, "agc": AutomaticGainControl, "identity": nn.Identity}


def batchnorms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def randomise_batchnorm_(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))


@pytest.mark.parametrize("replacement", ["affine", "agc", "identity"])
def test_resnet18(replacement):
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10)
    randomise_batchnorm_(model)
    before = batchnorms(model)
    old_state = copy.deepcopy(model.state_dict())
    result = replace_batchnorm(model, replacement)

    assert isinstance(result, Replacements) and result.module is model
    assert list(result) == before and len(before) == 20
    assert batchnorms(model) == []
    for name, old in result.items():
        new = model.get_submodule(name)
        assert type(new) is NEW_TYPE[replacement] and result.new_modules[name] is new
        assert old.__class__ is nn.BatchNorm2d
        if replacement == "affine":
            assert torch.equal(new.weight, old_state[f"{name}.weight"])
            assert torch.equal(new.bias, old_state[f"{name}.bias"])
        elif replacement == "agc":
            assert torch.equal(new.gain, old_state[f"{name}.weight"])
            assert torch.equal(new.bias, old_state[f"{name}.bias"])
            assert torch.equal(new.beta, torch.ones(old.num_features))
    # every non-BatchNorm parameter is untouched
    for key, value in model.state_dict().items():
        if key.split(".")[-1] in ("weight", "bias") and not any(key.startswith(f"{n}.") for n in result):
            assert torch.equal(value, old_state[key])
    # trains at batch size 1, per sample, same in train and eval
    x = torch.randn(3, 3, 32, 32)
    model.train()
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(model(x[1:2]), out[1:2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.eval()(x), out, atol=1e-5, rtol=1e-4)


def test_fresh_resnet18_affine_starts_as_before():
    """A freshly built BatchNorm (mean 0, variance 1) in eval mode is the affine layer up to eps."""
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    replace_batchnorm(model, "affine")
    torch.testing.assert_close(model(x), before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("replacement", ["affine", "fold"])
def test_fold_running_stats_reproduces_trained_batchnorm(replacement):
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10)
    randomise_batchnorm_(model)
    model.train()
    with torch.no_grad():  # give every BatchNorm real running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    replace_batchnorm(model, replacement, fold_running_stats=True)
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(MSRConfigurationError, match="only with replacement='affine' or 'fold', but got 'agc'"):
        replace_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), "agc", fold_running_stats=True)


@pytest.mark.parametrize("replacement", ["affine", "agc"])
def test_mobilenet_v3_small(replacement):
    torch.manual_seed(0)
    model = mobilenet_v3_small(weights=None, num_classes=10)
    count = len(batchnorms(model))
    assert count > 30
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert depthwise, "mobilenet_v3_small should contain depthwise convolutions"
    result = replace_batchnorm(model, replacement)
    assert len(result) == count and batchnorms(model) == []
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)  # the classifier's Dropout is the only train/eval difference left
    model.eval()
    torch.testing.assert_close(model(x[:1]), model(x)[:1], atol=1e-5, rtol=1e-4)
    assert out.shape == (2, 10)
    model.train()(x[:1]).sum().backward()  # batch size 1 in training mode


class Block(nn.Module):
    def __init__(self, shared: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = shared
        self.branches = nn.ModuleDict({"a": nn.Sequential(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4))})
        self.layers = nn.ModuleList([nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4, affine=False)])


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.BatchNorm2d(4)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
        self.block = Block(shared)
        self.again = shared  # the same instance under a second name
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))


@pytest.mark.parametrize("replacement", ["affine", "agc", "identity"])
def test_nested_custom_module(replacement):
    model = Nested()
    result = replace_batchnorm(model, replacement)
    assert list(result) == [
        "stem.1",
        "block.norm",
        "block.branches.a.1",
        "block.layers.1",
        "again",
        "head.2",
    ]
    assert batchnorms(model) == []
    assert type(result["stem.1"]) is nn.SyncBatchNorm
    assert model.block.norm is model.again  # a shared BatchNorm becomes one shared layer
    assert result.new_modules["block.norm"] is result.new_modules["again"]
    assert type(model.block.layers[1]) is NEW_TYPE[replacement]
    assert type(model.block.branches["a"][1]) is NEW_TYPE[replacement]
    if replacement != "identity":
        assert sum(1 for m in model.modules() if type(m) is NEW_TYPE[replacement]) == 5


def test_exclude_keeps_matching_batchnorm():
    model = Nested()
    result = replace_batchnorm(model, "agc", exclude=["head.*"])
    assert "head.2" not in result and batchnorms(model) == ["head.2"]
    assert type(model.head[2]) is nn.BatchNorm1d
    assert list(find_batchnorm(model)) == ["head.2"]
    assert find_batchnorm(model, exclude=["head.*"]) == {}


def test_root_is_batchnorm():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.fill_(2.0)
    with pytest.warns(MSRWarning, match="root module is itself a BatchNorm"):
        result = replace_batchnorm(bn, "agc", beta_init=0.5)
    assert list(result) == [""] and result[""] is bn
    new = result.module
    assert type(new) is AutomaticGainControl and result.new_modules[""] is new
    assert torch.equal(new.gain, torch.full((3,), 2.0)) and torch.equal(new.beta, torch.full((3,), 0.5))
    assert type(bn) is nn.BatchNorm2d  # the object passed in is unchanged
    assert replace_batchnorm(new, "agc") == {}


def test_idempotent():
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=10)
    first = replace_batchnorm(model, "agc")
    modules = dict(model.named_modules())
    state = copy.deepcopy(model.state_dict())
    for replacement in ("agc", "affine", "identity"):
        again = replace_batchnorm(model, replacement)
        assert again == {} and again.new_modules == {} and again.module is model
    assert len(first) == 20
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_keeps_device_dtype_mode_and_requires_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).double()
    model[1].eval()
    model[3].weight.requires_grad_(False)
    replace_batchnorm(model, "affine")
    assert model[1].weight.dtype == torch.float64 and model[1].bias.dtype == torch.float64
    assert not model[1].training and model[3].training
    assert not model[3].weight.requires_grad and model[3].bias.requires_grad

    meta = nn.Sequential(nn.BatchNorm2d(4, device="meta"))
    replace_batchnorm(meta, "agc")
    assert meta[0].gain.device.type == "meta"

    no_tensors = nn.Sequential(nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    replace_batchnorm(no_tensors, "affine")
    assert type(no_tensors[0]) is ChannelAffine and no_tensors[0].weight.dtype == torch.get_default_dtype()


def test_logs_how_many_layers(caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        replace_batchnorm(Nested(), "agc")
    assert "replaced 5 BatchNorm layers with AutomaticGainControl ('agc')" in caplog.text


def test_lazy_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(MSRConfigurationError, match=r"'1' is an uninitialised LazyBatchNorm2d.*forward pass"):
        replace_batchnorm(model)
    assert type(model[1]) is nn.LazyBatchNorm2d  # refused before anything changed
    model(torch.randn(1, 3, 5, 5))  # materialises it (it becomes a BatchNorm2d)
    assert list(replace_batchnorm(model)) == ["1"]


class PlainSubclass(nn.BatchNorm2d):
    """A subclass that adds no behaviour (e.g. a renamed class)."""


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm fused with an activation by its own forward (not timm's, whose layout is known)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


def test_batchnorm_subclasses():
    model = nn.Sequential(PlainSubclass(3))
    assert list(replace_batchnorm(model)) == ["0"]
    model = nn.Sequential(nn.BatchNorm2d(3), BatchNormAct(3))
    with pytest.raises(MSRConfigurationError, match="'1' is a BatchNormAct, a BatchNorm subclass with its own"):
        replace_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d  # all or nothing
    assert list(replace_batchnorm(model, exclude=["1"])) == ["0"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"replacement": "instance"},
            "Expected `replacement` to be one of 'fold', 'affine', 'agc_fold', 'agc', 'identity'",
        ),
        ({"beta_init": float("inf")}, r"Expected `beta_init` to be in \[0, 1\], but got inf."),
        ({"fold_running_stats": 1}, "Expected `fold_running_stats` to be True or False, but got 1."),
        ({"exclude": [""]}, "Expected `exclude` to be a list of module-name patterns"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(MSRConfigurationError, match=match):
        replace_batchnorm(nn.BatchNorm2d(2), **kwargs)
    with pytest.raises(MSRConfigurationError, match=r"Expected `module` to be a torch.nn.Module, but got dict"):
        replace_batchnorm({})


def test_refuses_data_parallel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(MSRConfigurationError, match=r"`module` is a DataParallel.*Replace BatchNorm before wrapping"):
        replace_batchnorm(nn.DataParallel(model))
    assert type(model[1]) is nn.BatchNorm2d


def test_refuses_distributed_data_parallel(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        wrapped = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(MSRConfigurationError, match=r"`module` is a DistributedDataParallel.*DeepControl"):
            replace_batchnorm(wrapped, "agc")
        outer = nn.ModuleDict({"model": wrapped})  # e.g. a wrapper around the DDP module
        with pytest.raises(MSRConfigurationError, match=r"`module` contains \('model'\) a DistributedDataParallel"):
            replace_batchnorm(outer)
        assert type(model[1]) is nn.BatchNorm2d
    finally:
        dist.destroy_process_group()


def test_exclude_pattern_matching_nothing_is_refused():
    model = Nested()
    with pytest.raises(
        MSRConfigurationError,
        match=r"The `exclude` pattern 'haed.\*' matches no module of Nested. Module names look like \[",
    ):
        replace_batchnorm(model, "agc", exclude=["haed.*"])
    assert batchnorms(model) == batchnorms(Nested())  # nothing was replaced


@pytest.mark.parametrize("beta_init", [-0.5, 2.0])
def test_beta_init_outside_0_1_is_refused(beta_init):
    with pytest.raises(MSRConfigurationError, match=rf"Expected `beta_init` to be in \[0, 1\], but got {beta_init}"):
        replace_batchnorm(Nested(), "agc", beta_init=beta_init)


# --------------------------------------------------------------------------- folding into the conv
@pytest.mark.parametrize(("folded", "unfolded"), [("fold", "affine"), ("agc_fold", "agc")])
@pytest.mark.parametrize("build", [resnet18, mobilenet_v2], ids=["resnet18", "mobilenet_v2"])
def test_fold_computes_what_the_unfolded_replacement_computes(build, folded, unfolded):
    torch.manual_seed(0)
    model = build(weights=None, num_classes=10)
    randomise_batchnorm_(model)
    reference = copy.deepcopy(model)
    count = len(batchnorms(model))
    result = replace_batchnorm(model, folded)
    replace_batchnorm(reference, unfolded)
    assert len(result.folded) == count  # every BatchNorm of these models directly follows a plain conv
    assert batchnorms(model) == []
    for bn_name, conv_name in result.folded.items():
        conv = model.get_submodule(conv_name)
        assert type(conv) is ScaledConv2d
        if folded == "fold":
            assert type(model.get_submodule(bn_name)) is nn.Identity
            torch.testing.assert_close(conv.scale, reference.get_submodule(bn_name).weight)
            torch.testing.assert_close(conv.bias, reference.get_submodule(bn_name).bias)
        else:
            agc = model.get_submodule(bn_name)
            assert type(agc) is AutomaticGainControl and agc.gain is None
            torch.testing.assert_close(conv.scale, reference.get_submodule(bn_name).gain)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    # the same parameter count: BatchNorm's (weight, bias) became the conv's (scale, bias)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())


def test_fold_keeps_the_conv_module_its_weight_and_hooks():
    conv = nn.Conv2d(3, 4, 3, bias=True)
    net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())
    randomise_batchnorm_(net)
    weight, bias = conv.weight, conv.bias
    reference = copy.deepcopy(net)
    replace_batchnorm(reference, "affine")
    seen = []
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 8, 8)
    result = replace_batchnorm(net, "fold")
    assert result.folded == {"1": "0"} and net[0] is conv and type(conv) is ScaledConv2d
    assert conv.weight is weight and conv.bias is bias  # the conv's own bias c became scale * c + shift
    torch.testing.assert_close(net(x), reference(x))
    assert len(seen) == 1  # the hook moved with the module: it sees the scaled and shifted output
    handle.remove()
    net(x)
    assert len(seen) == 1


def test_fold_only_when_the_conv_output_feeds_nothing_but_the_batchnorm(caplog):
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.bn3 = nn.BatchNorm2d(4)  # after a ReLU, not after a conv
            self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
            z = self.bn2(y) + y  # conv2's output feeds the sum too
            z = self.bn3(torch.relu(z))
            return self.bn4(self.conv4(z)) + self.conv4(z)  # conv4 is called twice

    model = Residual()
    randomise_batchnorm_(model)
    reference = copy.deepcopy(model)
    replace_batchnorm(reference, "affine")
    assert find_foldable_pairs(model) == {"bn1": "conv1"}
    with caplog.at_level(logging.INFO):
        result = replace_batchnorm(model, "fold")
    assert result.folded == {"bn1": "conv1"}
    assert [type(model.get_submodule(n)) for n in ("bn2", "bn3", "bn4")] == [ChannelAffine] * 3
    messages = [r.getMessage() for r in caplog.records if "'fold'" in r.getMessage()]
    assert len(messages) == 1 and "3 ('bn2', 'bn3', 'bn4') got a separate ChannelAffine" in messages[0]
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(model(x), reference(x))


def test_fold_skips_convs_that_are_shared_read_directly_or_not_plain():
    class StdConv(nn.Conv2d):  # a subclass may compute its weight differently
        pass

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Conv2d(4, 4, 1)
            self.a, self.bn_a = self.shared, nn.BatchNorm2d(4)  # one conv under two names
            self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.c, self.bn_c = StdConv(4, 4, 1), nn.BatchNorm2d(4)
            self.d, self.bn_d = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn_a(self.a(x))
            x = self.bn_b(self.b(x)) + self.b.weight.sum()  # the graph reads b's weight directly
            x = self.bn_c(self.c(x))
            return self.bn_d(self.d(x))

    assert find_foldable_pairs(Odd()) == {"bn_d": "d"}
    assert find_foldable_pairs(Odd(), exclude=["bn_d"]) == {}


def test_fold_finds_pairs_inside_submodules_of_a_model_that_does_not_trace():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.gate = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            if x.mean() > 0:  # control flow on a tensor value: torch.fx cannot trace this
                x = self.gate(x)
            return x

    model = Untraceable()
    assert find_foldable_pairs(model) == {"stem.1": "stem.0"}
    result = replace_batchnorm(model, "fold")
    assert result.folded == {"stem.1": "stem.0"} and type(model.gate) is ChannelAffine


def test_fold_nested_modules_and_1d_convs():
    model = Nested()
    result = replace_batchnorm(model, "fold")
    assert result.folded == {"stem.1": "stem.0", "block.branches.a.1": "block.branches.a.0"}
    assert type(model.stem[0]) is ScaledConv2d and type(model.block.branches["a"][0]) is ScaledConv1d
    assert type(model.head[2]) is ChannelAffine and model.block.norm is model.again
    assert replace_batchnorm(model, "fold") == {}  # harmless to apply twice


def test_fold_keeps_device_dtype_mode_and_requires_grad():
    conv = nn.Conv2d(2, 3, 3, bias=False).double()
    bn = nn.BatchNorm2d(3).double().eval()
    bn.bias.requires_grad_(False)
    net = nn.Sequential(conv, bn)
    replace_batchnorm(net, "fold")
    assert conv.scale.dtype == conv.bias.dtype == torch.float64 and conv.scale.requires_grad
    assert not conv.bias.requires_grad and not net[1].training


def test_merge_scaled_convs_gives_plain_convs_with_the_same_outputs():
    torch.manual_seed(0)
    model = mobilenet_v2(weights=None, num_classes=10)
    randomise_batchnorm_(model)
    replace_batchnorm(model, "fold")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ScaledConv2d):
                module.scale.uniform_(0.5, 2.0)  # as if trained
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    merged = merge_scaled_convs(model)
    assert len(merged) == 52 and not any(isinstance(m, ScaledConv2d) for m in model.modules())
    assert not any(name.endswith(".scale") for name, _ in model.named_parameters())
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert merge_scaled_convs(model) == []
    with pytest.raises(MSRConfigurationError, match=r"Expected `module` to be a torch\.nn\.Module, but got list"):
        merge_scaled_convs([])


@pytest.mark.parametrize("replacement", ["fold", "agc_fold"])
def test_checkpoint_of_a_folded_model_loads_after_the_same_surgery(replacement):
    torch.manual_seed(0)
    trained = resnet18(weights=None, num_classes=10)
    replace_batchnorm(trained, replacement)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # as if trained
    state = copy.deepcopy(trained.state_dict())
    fresh = resnet18(weights=None, num_classes=10)
    replace_batchnorm(fresh, replacement)
    fresh.load_state_dict(state)  # strict: the same keys and shapes
    trained.eval(), fresh.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(fresh(x), trained(x))
