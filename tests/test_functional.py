"""Math properties of lightning_msr.functional (projection, zero-mean init, mean shift, group rule)."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import DEFAULT_MODE
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_msr.exceptions import MSRConfigurationError, MSRWarning
from lightning_msr.functional import (
    KernelBank,
    adaptive_clip_,
    eligible_weights,
    filter_norms,
    kernel_groups,
    mean_shift,
    project_groups_,
    project_mean_,
    zero_mean_init_,
)


def reference_group_mean(
    weight: torch.Tensor, transposed: bool = False, groups: int = 1, mode: str = "kernel"
) -> torch.Tensor:
    """Independent reference of DESIGN.md's group rule, written with explicit loops over the groups."""
    w = weight.double()
    out = torch.empty_like(w)
    if w.dim() == 2 or (mode == "filter" and not transposed):  # a Linear row, or a whole filter
        for o in range(w.shape[0]):
            out[o] = w[o].mean()
        return out
    if math.prod(w.shape[2:]) > 1:
        for o in range(w.shape[0]):
            for i in range(w.shape[1]):
                out[o, i] = w[o, i].mean()
        return out
    if not transposed:
        for o in range(w.shape[0]):
            out[o] = w[o].mean()
        return out
    per = w.shape[0] // groups
    for g in range(groups):
        for j in range(w.shape[1]):
            block = w[g * per : (g + 1) * per, j]
            out[g * per : (g + 1) * per, j] = block.mean()
    return out


@st.composite
def conv_weights(draw):
    """Random conv-like weight shapes: 1d/2d/3d, grouped, depthwise, pointwise, transposed, Linear."""
    kind = draw(st.sampled_from(["conv", "depthwise", "pointwise", "transposed", "transposed_pointwise", "linear"]))
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    per_in = draw(st.integers(1, 4))
    per_out = draw(st.integers(1, 4))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    if kind == "linear":
        shape, transposed, groups = (per_out * groups, draw(st.integers(2, 9))), False, 1
    elif kind == "depthwise":
        shape, transposed = (per_out * groups, 1, *kernel), False
    elif kind == "pointwise":
        shape, transposed = (per_out * groups, max(per_in, 2), *([1] * dims)), False
    elif kind == "transposed":
        shape, transposed = (per_in * groups, per_out, *kernel), True
    elif kind == "transposed_pointwise":
        shape, transposed = (max(per_in, 2) * groups, per_out, *([1] * dims)), True
    else:
        shape, transposed = (per_out * groups, per_in, *kernel), False
    seed = draw(st.integers(0, 2**16))
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return weight, transposed, groups


def _centrable(weight, transposed, groups, mode):
    if weight.dim() == 2 or (mode == "filter" and not transposed):
        return math.prod(weight.shape[1:]) > 1
    if math.prod(weight.shape[2:]) > 1:
        return True
    return (weight.shape[0] // groups if transposed else weight.shape[1]) > 1


@pytest.mark.parametrize("mode", ["kernel", "filter"])
@settings(max_examples=150, deadline=None)
@given(case=conv_weights(), alpha=st.floats(0.0, 1.0))
def test_projection_properties(case, alpha, mode):
    weight, transposed, groups = case
    if not _centrable(weight, transposed, groups, mode):
        return
    kw = {"transposed": transposed, "groups": groups, "mode": mode}
    g = weight.clone()
    p = project_mean_(g.clone(), 1.0, **kw)
    # removes the group means to float precision
    assert reference_group_mean(p, **kw).abs().max() <= 1e-12 * max(1.0, float(g.abs().max()))
    # matches the independent reference
    torch.testing.assert_close(p, g - reference_group_mean(g, **kw))
    # idempotent
    torch.testing.assert_close(project_mean_(p.clone(), 1.0, **kw), p)
    # orthogonal: <P g, g - P g> = 0
    assert abs(float((p * (g - p)).sum())) <= 1e-9 * float(g.square().sum())
    # alpha scales the removed part
    pa = project_mean_(g.clone(), alpha, **kw)
    torch.testing.assert_close(g - pa, alpha * (g - p))


@pytest.mark.parametrize("mode", ["kernel", "filter"])
@settings(max_examples=100, deadline=None)
@given(case=conv_weights(), magnitude=st.floats(0.1, 5.0))
def test_zero_mean_init_properties(case, magnitude, mode):
    weight, transposed, groups = case
    if not _centrable(weight, transposed, groups, mode):
        return
    kw = {"transposed": transposed, "groups": groups, "mode": mode}
    w = zero_mean_init_(torch.empty_like(weight), magnitude, torch.Generator().manual_seed(1), **kw)
    assert reference_group_mean(w, **kw).abs().max() < 1e-12
    if transposed and w.dim() > 2:
        per = w.shape[0] // groups
        norms = torch.stack([w[g * per : (g + 1) * per, j].norm() for g in range(groups) for j in range(w.shape[1])])
    else:
        norms = w.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, magnitude))
    assert float(mean_shift(w, **kw)) < 1e-6


def test_zero_mean_init_is_uniform_draw_and_reproducible():
    a = zero_mean_init_(torch.empty(64, 32, 3, 3), generator=torch.Generator().manual_seed(3))
    b = zero_mean_init_(torch.empty(64, 32, 3, 3), generator=torch.Generator().manual_seed(3))
    c = zero_mean_init_(torch.empty(64, 32, 3, 3), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # a centred U(-1, 1) draw scaled to unit filter norm: entries of both signs, no filter dominated by one value
    assert (a > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_zero_mean_init_leaves_global_rng_alone():
    state = torch.get_rng_state()
    zero_mean_init_(torch.empty(8, 4, 3, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_zero_mean_init_keeps_dtype_and_works_in_low_precision():
    w = zero_mean_init_(torch.empty(8, 4, 3, 3, dtype=torch.bfloat16), generator=torch.Generator().manual_seed(0))
    assert w.dtype == torch.bfloat16
    assert float(mean_shift(w)) < 1e-2  # bf16 rounding of the centred values


# the dims one mean runs over, for a non-transposed spatial conv weight
MODE_DIMS = {"kernel": (2, 3), "filter": (1, 2, 3)}


@pytest.mark.parametrize("mode", ["kernel", "filter"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_projection_uses_float32_mean(dtype, mode):
    dims = MODE_DIMS[mode]
    g = (torch.randn(16, 8, 3, 3) + 3.0).to(dtype)
    expected = g.float() - g.float().mean(dim=dims, keepdim=True)
    project_mean_(g, mode=mode)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), expected, atol=2e-2, rtol=1e-2)
    assert g.float().mean(dim=dims).abs().max() < 2e-2


def test_the_default_mode_is_the_callbacks():
    """A plain loop calling the functions with their defaults does what MeanShiftRejection() does: every public
    function of `functional` and `fused` that takes a `mode` defaults to the callback's."""
    import inspect

    import lightning_msr.functional as functional
    import lightning_msr.fused as fused

    found = {}
    for module in (functional, fused):
        for name in module.__all__:
            obj = getattr(module, name)
            for fn_name, fn in [(name, obj)] + [(f"{name}.{m}", getattr(obj, m)) for m in ("of",) if hasattr(obj, m)]:
                if callable(fn) and not inspect.isclass(fn) and "mode" in inspect.signature(fn).parameters:
                    found[fn_name] = inspect.signature(fn).parameters["mode"].default
    assert {"project_mean_", "mean_shift", "zero_mean_init_", "kernel_groups", "FusedWeight.of"} <= set(found)
    assert found == dict.fromkeys(found, DEFAULT_MODE)
    g = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(project_mean_(g.clone()), project_mean_(g.clone(), mode=DEFAULT_MODE))


def test_filter_mode_equals_gradient_centralization():
    """mode="filter" is Gradient Centralization (Yong et al. 2020): x - x.mean(dim=1..)."""
    g = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    gc = g - g.mean(dim=(1, 2, 3), keepdim=True)  # pytorch_optimizer.centralize_gradient, written out
    torch.testing.assert_close(project_mean_(g.clone(), mode="filter"), gc)
    lin = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(project_mean_(lin.clone(), mode="filter"), lin - lin.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1)])
def test_a_conv_transpose_keeps_its_kernels_groups_in_filter_mode(kernel):
    """A ConvTranspose weight (in, out / groups, *k) has its output filters across dim 1: Gradient Centralization's
    dim-0 slices are not filters, and calibration's per-output-channel scales would move them off zero mean. So in
    filter mode it keeps the groups of kernel mode, and one output channel's scale leaves it zero-mean."""
    w = torch.randn(6, 4, *kernel, dtype=torch.float64)  # groups=2: 3 inputs x 4 outputs per group
    kw = {"transposed": True, "groups": 2}
    assert kernel_groups(w, "filter", **kw) == kernel_groups(w, "kernel", **kw)
    torch.testing.assert_close(project_mean_(w.clone(), mode="filter", **kw), project_mean_(w.clone(), **kw))
    torch.testing.assert_close(filter_norms(w, "filter", **kw), filter_norms(w, "kernel", **kw))
    centred = project_mean_(w.clone(), mode="filter", **kw)
    centred[:, 1] *= 3.0  # calibration scales output channel 1 (dim 1 of a ConvTranspose weight)
    assert float(mean_shift(centred, mode="filter", **kw)) < 1e-6  # float32, as mean_shift computes


@pytest.mark.parametrize("mode", ["kernel", "filter"])
def test_projection_of_channels_last_and_non_contiguous_tensors(mode):
    dims = MODE_DIMS[mode]
    g = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    expected = g - g.mean(dim=dims, keepdim=True)
    project_mean_(g, mode=mode)
    assert g.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(g, expected)
    base = torch.randn(8, 8, 3, 3)
    view = base[:, ::2]  # non-contiguous view: projected in place through the view
    expected = view - view.mean(dim=dims, keepdim=True)
    project_mean_(view, mode=mode)
    torch.testing.assert_close(base[:, ::2], expected)


@pytest.mark.parametrize("mode", ["kernel", "filter"])
def test_projection_of_a_list_and_alpha_zero(mode):
    a, b = torch.randn(4, 2, 3), torch.randn(3, 3, 2, 2)
    out = project_mean_([a, b], mode=mode)
    assert isinstance(out, list) and out[0] is a and out[1] is b
    a_dims, b_dims = ((2,), (2, 3)) if mode == "kernel" else ((1, 2), (1, 2, 3))
    assert a.mean(dim=a_dims).abs().max() < 1e-6 and b.mean(dim=b_dims).abs().max() < 1e-6
    c = torch.randn(4, 2, 3)
    before = c.clone()
    project_mean_(c, alpha=0.0)
    assert torch.equal(c, before)


def test_single_element_groups_are_skipped_with_a_warning():
    w = torch.randn(8, 1, 1, 1)  # pointwise depthwise conv: every group has one element
    before = w.clone()
    with pytest.warns(MSRWarning, match="single element"):
        project_mean_(w, alpha=1.0)
    assert torch.equal(w, before)
    assert float(mean_shift(w)) == 0.0


def test_mean_shift_values():
    w = torch.zeros(2, 1, 2, 2)
    w[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # mean 1, rms over all 8 entries = sqrt(4/8)
    assert float(mean_shift(w)) == pytest.approx(1 / math.sqrt(0.5))
    assert float(mean_shift(torch.zeros(3, 2, 3, 3))) == 0.0
    fresh = nn.Conv2d(16, 16, 3).weight
    assert float(mean_shift(fresh)) > 0.1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: project_mean_(torch.randn(2, 2, 3), alpha=1.5), r"Expected `alpha` to be in \[0, 1\], but got 1.5"),
        (lambda: project_mean_(torch.randn(2, 2, 3), alpha="1"), r"Expected `alpha` to be a number"),
        (lambda: project_mean_(torch.randn(2, 2, 3), mode="spatial"), r"Expected `mode` to be one of 'kernel'"),
        (lambda: project_mean_(torch.randn(5)), r"at least 2 dims"),
        (lambda: project_mean_([torch.randn(2, 2), 3]), r"Expected `tensors` to hold tensors"),
        (lambda: zero_mean_init_(torch.empty(2, 2, 3), magnitude=0.0), r"Expected `magnitude` to be a finite positive"),
        (lambda: zero_mean_init_(torch.empty(2, 2, 3), magnitude=-1), r"positive number, but got -1"),
        (lambda: mean_shift(torch.randn(2, 2, 3), mode="x"), r"Expected `mode` to be one of"),
        (
            lambda: project_mean_(torch.randn(5, 2, 1, 1), transposed=True, groups=2),
            r"Expected `groups` to divide the weight's first dim 5, but got 2",
        ),
        (lambda: eligible_weights(nn.Conv2d(1, 1, 3), exclude=[3]), r"Expected `exclude` to be a list of module-name"),
        (lambda: eligible_weights(nn.Conv2d(1, 1, 3), include_linear="yes"), r"Expected `include_linear` to be True"),
    ],
)
def test_error_messages(call, match):
    with pytest.raises(MSRConfigurationError, match=match):
        call()


def test_eligible_weights_finds_convs_transposed_and_shared_once():
    conv = nn.Conv2d(4, 4, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(2, 4, 3)
            self.body = nn.Sequential(conv, nn.ReLU(), conv)  # shared weight
            self.up = nn.ConvTranspose2d(4, 6, 2, groups=2)
            self.norm = nn.GroupNorm(2, 6)
            self.head = nn.Linear(6, 3)
            self.emb = nn.Embedding(5, 3)

    net = Net()
    found = eligible_weights(net)
    assert [w.name for w in found] == ["stem.weight", "body.0.weight", "up.weight"]
    up = found[-1]
    assert up.transposed and up.groups == 2 and up.centrable
    assert [w.name for w in eligible_weights(net, exclude=["body.*"])] == ["stem.weight", "up.weight"]
    assert eligible_weights(net, include_linear=True)[-1].name == "head.weight"
    lazy = nn.Sequential(nn.LazyConv2d(4, 3))
    assert eligible_weights(lazy) == []


# ---------------------------------------------------------------- what a new user runs into (issue 16)


def _zero_mean_kernels() -> torch.Tensor:
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    return w - w.mean(dim=(2, 3), keepdim=True)


def _with(value: float) -> torch.Tensor:
    w = _zero_mean_kernels()
    w[1, 0, 2, 1] = value
    return w


@pytest.mark.parametrize(
    "weight",
    [torch.full((4, 2, 3, 3), float("nan")), _with(float("nan")), _with(float("inf")), _with(float("-inf"))],
    ids=["all-nan", "one-nan", "one-inf", "one-minus-inf"],
)
@pytest.mark.parametrize("mode", ["kernel", "filter"])
def test_mean_shift_of_a_non_finite_weight_is_never_zero(weight, mode):
    shift = float(mean_shift(weight, mode=mode))
    assert math.isnan(shift) or math.isinf(shift)
    assert float(mean_shift(_zero_mean_kernels())) < 1e-6  # the finite control reads 0
    assert float(mean_shift(torch.zeros(4, 2, 3, 3))) == 0.0


def test_mean_shift_of_an_uncentrable_non_finite_weight_is_nan():
    assert float(mean_shift(torch.ones(3, 1, 1, 1))) == 0.0
    assert math.isnan(float(mean_shift(torch.full((3, 1, 1, 1), float("inf")))))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_filter_norms_are_accumulated_in_at_least_float32(dtype, transposed):
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).to(dtype)
    norms = filter_norms(w, "kernel", transposed, 2, dtype=torch.float32)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exact = filter_norms(w.double(), "kernel", transposed, 2)
    torch.testing.assert_close(norms.double(), exact, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


def test_eligible_weights_refuses_an_exclude_pattern_that_matches_nothing():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3)))
    with pytest.raises(
        MSRConfigurationError,
        match=r"The `exclude` pattern '2' matches no module of Sequential. Module names look like \['0', '1', '1.0'\]",
    ):
        eligible_weights(net, exclude=["0", "2"])
    assert [w.name for w in eligible_weights(net, exclude=["1.*"])] == ["0.weight"]


@pytest.mark.parametrize("alpha", [np.float32(0.5), torch.tensor(0.5), Fraction(1, 2), Decimal("0.5")])
def test_project_mean_accepts_any_real_alpha(alpha):
    g = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    torch.testing.assert_close(project_mean_(g.clone(), alpha=alpha), project_mean_(g.clone(), alpha=0.5))


@pytest.mark.parametrize("alpha", [True, np.bool_(True), torch.tensor(True), 0.5 + 0j, torch.tensor([0.5]), "0.5"])
def test_project_mean_refuses_bool_and_non_real_alpha(alpha):
    with pytest.raises(MSRConfigurationError, match=r"Expected `alpha` to be a number in \[0, 1\], but got"):
        project_mean_(torch.randn(2, 2, 3), alpha=alpha)


@pytest.mark.parametrize(
    ("shape", "mode", "transposed", "groups"),
    [
        ((6, 4, 3, 3), "kernel", False, 1),
        ((6, 4, 3, 3), "filter", False, 1),
        ((6, 4, 1, 1), "kernel", False, 1),
        ((8, 3, 1, 1), "kernel", True, 2),
        ((5, 7), "kernel", False, 1),
    ],
)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_project_groups_with_kernel_groups_matches_project_mean(shape, mode, transposed, groups, alpha):
    """The hot-path pair (groups taken once, then applied) gives what the checked public projection gives."""
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    layout = kernel_groups(grad, mode, transposed, groups)
    assert layout == kernel_groups(shape, mode, transposed, groups)  # a tensor and its shape agree
    expected = project_mean_(grad.clone(), alpha, mode=mode, transposed=transposed, groups=groups)
    out = grad.clone()
    assert project_groups_(out, layout, alpha) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_kernel_groups_of_single_element_groups_is_none():
    assert kernel_groups((16, 1, 1, 1)) is None  # pointwise depthwise: one input per filter
    with pytest.raises(MSRConfigurationError, match="at least 2 dims"):
        kernel_groups(torch.empty(16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_clip_of_vectors_is_element_wise(dtype):
    """Gains and biases are clipped element by element (grouped into a few foreach operations): every element's
    gradient ends at min(|g|, clip * max(|w|, eps)) with its sign, whatever the mix of sizes."""
    g = torch.Generator().manual_seed(0)
    params = []
    for size in (3, 7, 1):
        value = torch.randn(size, generator=g) * torch.tensor(10.0) ** torch.randn(size, generator=g)
        p = torch.nn.Parameter(value.to(dtype))
        p.grad = (torch.randn(size, generator=g) * 5).to(dtype)
        params.append(p)
    params[2].data.zero_()  # a zero-initialised bias moves by clip * eps at most
    expected = [
        torch.sign(p.grad.float()) * torch.minimum(p.grad.float().abs(), 0.1 * p.detach().float().abs().clamp(min=0.5))
        for p in params
    ]
    adaptive_clip_(params, clip=0.1, eps=0.5)
    for p, e in zip(params, expected):
        assert p.grad.dtype == dtype
        torch.testing.assert_close(p.grad.float(), e, rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- KernelBank

BANK_SHAPES = [
    ((8, 4, 3, 3), "kernel"),  # spatial kernels
    ((6, 3, 5, 5), "kernel"),  # another kernel size: its own section
    ((8, 6, 1, 1), "kernel"),  # pointwise: whole filters
    ((8, 1, 3, 3), "kernel"),  # depthwise: each filter one kernel
    ((8, 2, 3, 3), "kernel"),  # grouped conv
    ((5, 7), "kernel"),  # Linear rows
    ((4, 3, 5), "kernel"),  # Conv1d
    ((2, 2, 3, 3, 3), "kernel"),  # Conv3d
    ((8, 4, 3, 3), "filter"),  # Gradient Centralization
]


def _bank_case(seed: int, modes=("kernel", "filter")):
    g = torch.Generator().manual_seed(seed)
    params, layouts = [], []
    for shape, mode in BANK_SHAPES:
        if mode not in modes:
            continue
        p = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64))
        p.grad = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        params.append(p)
        layouts.append(kernel_groups(p, mode))
    return params, layouts


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
@pytest.mark.parametrize("clip", [0.1, None])
def test_kernel_bank_equals_the_per_weight_projection_and_clipping(alpha, clip):
    params, layouts = _bank_case(0)
    expected = []
    for p, layout in zip(params, layouts):
        grad = p.grad.clone()
        project_groups_(grad, layout, alpha)
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = grad
        if clip is not None:
            adaptive_clip_([q], clip)
        expected.append(q.grad)
    # parameters only clipped: a free stem, a Linear weight and a scale (relative to their size), and a bias
    # (relative to max(|b|, 1)), as adaptive_clip_ does them one by one
    g = torch.Generator().manual_seed(5)
    clipped = [
        torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in ((4, 1, 7, 7), (3, 8), (8,))
    ]
    offsets = [torch.nn.Parameter(torch.randn(8, generator=g, dtype=torch.float64) * 3)]
    for q in clipped + offsets:
        q.grad = torch.randn(q.shape, generator=g, dtype=torch.float64)
    others = []
    for q, eps in [(q, 1e-3) for q in clipped] + [(q, 1.0) for q in offsets]:
        r = torch.nn.Parameter(q.detach().clone())
        r.grad = q.grad.clone()
        if clip is not None:
            adaptive_clip_([r], clip, eps=eps)
        others.append(r.grad)
    KernelBank(params, layouts, clipped=clipped, offsets=offsets).project_and_clip_(alpha, clip)
    for p, want in zip(params + clipped + offsets, expected + others):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)


def test_kernel_bank_equals_the_per_weight_recentring_and_rescaling():
    params, layouts = _bank_case(1)
    with torch.no_grad():
        params[0][3].zero_()  # an all-zero filter: kept free
    targets = [filter_norms(p.detach()) * 0 + 1.5 for p in params]
    targets[0][3] = 0.0
    expected = []
    for p, layout, target in zip(params, layouts, targets):
        w = p.detach().clone()
        project_groups_(w, layout, 1.0)
        ratio = target / filter_norms(w).clamp(min=torch.finfo(w.dtype).tiny)
        ratio[target == 0] = 1.0
        expected.append(w * ratio)
    bank = KernelBank(params, layouts)
    bank.keep_norms(targets)
    bank.recenter_and_rescale_(recenter=True, rescale=True)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)
    # the norms kept from the weights themselves hold them where they are
    before = [p.detach().clone() for p in params]
    bank.keep_norms()
    bank.recenter_and_rescale_(recenter=False, rescale=True)
    for p, want in zip(params, before):
        torch.testing.assert_close(p.detach(), want)


def test_kernel_bank_refuses_what_it_cannot_hold():
    w = torch.randn(8, 4, 3, 3)
    assert KernelBank.accepts(w, kernel_groups(w))
    assert not KernelBank.accepts(w, kernel_groups(w), transposed=True)
    assert KernelBank.accepts(w, None, transposed=True, centred=False)  # a ConvTranspose's filters are clipped
    assert "no kernel group" in KernelBank.why_not(w, None)
    assert "bfloat16" in KernelBank.why_not(w.bfloat16(), kernel_groups(w))
    assert "contiguous" in KernelBank.why_not(w.to(memory_format=torch.channels_last), kernel_groups(w))
    with pytest.raises(MSRConfigurationError, match="share one device and one dtype"):
        KernelBank([w, w.double()], [kernel_groups(w)] * 2)
