"""statscope.nn factory, convert, fuse, state_dict, torch.compile, errors and import hygiene."""

import ast
import copy
import io
import pathlib
import warnings

import pytest
import torch
from torch import nn

import statscope.nn as snn
from statscope.errors import StatscopeError, StatscopeWarning
from statscope.nn import (NORM_NAMES, HeteroNorm, SwitchableNorm, convert, fuse, is_norm_layer,
                          make_norm)

FUSABLE = {"bn", "en", "en_g8", "hn", "hn_g32", "bn+en"}


def trained(layer, shape, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        for _ in range(steps):
            layer(torch.randn(shape, generator=gen) * 2 + torch.randn(shape[1], generator=gen)
                  .reshape(1, -1, *[1] * (len(shape) - 2)))
    return layer


@pytest.mark.parametrize("name", NORM_NAMES)
def test_every_name_builds_the_paper_layer(name):
    layer = make_norm(name.upper(), 64)
    expected = {"bn": ("batch", "batch"), "in": ("instance", "instance"),
                "ln": ("layer", "layer"), "gn": ("group", "group"),
                "en": ("extended", "extended"), "sn": (("batch", "instance", "layer"),) * 2,
                "hn": ("batch", "extended"), "bn+en": (("batch",), ("batch", "extended")),
                "bn+in+ln": (("batch",), ("batch", "instance", "layer"))}[name.split("_g")[0]]
    sets = tuple((s,) if isinstance(s, str) else s for s in expected)
    assert (layer.mean_sets, layer.std_sets) == sets
    assert is_norm_layer(layer) and layer.norm_name == name
    assert layer.num_features == 64 and layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.fusable == (name in FUSABLE)
    if "extended" in layer.std_sets or "group" in layer.std_sets:
        assert layer.std_groups == {"gn": 32, "en_g8": 8, "hn_g32": 32}.get(name, 1)


def test_factory_rejects_unknown_names_listing_known_ones():
    with pytest.raises(StatscopeError, match=r"norm='xn'.*known: bn, in, ln, gn, en"):
        make_norm("xn", 8)
    with pytest.raises(StatscopeError, match=r"norm='bn_g4': bn has no channel groups"):
        make_norm("bn_g4", 8)
    with pytest.raises(StatscopeError, match=r"groups=2: norm='hn_g4' already sets 4"):
        make_norm("hn_g4", 8, groups=2)


@pytest.mark.parametrize("build,match", [
    (lambda: make_norm("gn", 64, groups=3), r"groups=3: num_features=64 is not divisible"),
    (lambda: make_norm("en_g5", 64), r"groups=5: num_features=64 is not divisible"),
    (lambda: HeteroNorm(8, "batch", "pixel"), r"std_set='pixel': unknown pixel set; expected one"),
    (lambda: SwitchableNorm(8, ("batch", "batch")), r"mean_sets=.*listed twice"),
    (lambda: HeteroNorm(8, std_center="median"), r"std_center='median': expected one of own"),
    (lambda: HeteroNorm(0), r"num_features=0: expected a positive int"),
    (lambda: HeteroNorm(8, momentum=2.0), r"momentum=2.0: expected a float in \[0, 1\]"),
])
def test_bad_arguments_raise_naming_the_value(build, match):
    with pytest.raises(StatscopeError, match=match):
        build()


def test_impossible_sets_for_a_shape_name_the_norm_and_the_shape():
    with pytest.raises(StatscopeError, match=r"input shape \(8, 16\): norm in needs pixel set "
                                             r"'instance'"):
        make_norm("in", 16)(torch.randn(8, 16))
    with pytest.raises(StatscopeError, match=r"input shape \(8, 3, 4\).*num_features = 16"):
        make_norm("hn", 16)(torch.randn(8, 3, 4))
    with pytest.raises(StatscopeError, match=r"input shape \(1, 16\): norm bn .*'batch'"):
        make_norm("bn", 16)(torch.randn(1, 16))
    make_norm("bn", 16).eval()(torch.randn(1, 16))  # eval uses running statistics: no error


def test_std_centering_worked_example():
    # two channels with means 0 and 10, each taking the values mean ± 1 (variance 1)
    x = torch.tensor([[-1.0, 9.0], [1.0, 11.0]], dtype=torch.float64)
    # eps = 1e-300 vanishes beside these variances in float64 (eps = 0 is refused)
    own = HeteroNorm(2, "batch", "extended", eps=1e-300, dtype=torch.float64)(x)
    subtracted = HeteroNorm(2, "batch", "extended", eps=1e-300, std_center="subtracted",
                            dtype=torch.float64)(x)
    # own: variance of all four pixels around 5 = 1 + 25 = 26; subtracted: around 0 and 10 = 1
    torch.testing.assert_close(own, torch.tensor([[-1.0, -1.0], [1.0, 1.0]],
                                                 dtype=torch.float64) / 26 ** 0.5)
    torch.testing.assert_close(subtracted, torch.tensor([[-1.0, -1.0], [1.0, 1.0]],
                                                        dtype=torch.float64))


@pytest.mark.parametrize("name", NORM_NAMES)
def test_state_dict_round_trip(name):
    channels = 64
    layer = trained(make_norm(name, channels), (4, channels, 3, 3))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_norm(name, channels)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(2, channels, 3, 3)
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x), rtol=0, atol=0)
    keys = set(layer.state_dict())
    assert ("running_mean" in keys) == (name not in ("in", "ln", "gn"))


def test_buffer_naming_of_mixtures():
    layer = make_norm("bn+en", 8)
    assert {n for n, _ in layer.named_buffers()} == {
        "running_mean", "running_var", "running_var_extended", "num_batches_tracked"}
    assert make_norm("ln", 8).running_mean is None
    assert make_norm("bn", 8, track_running_stats=False).running_var is None


def fused_pair_model():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), make_norm("hn", 16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, bias=False), make_norm("bn+en", 16, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 1), make_norm("gn", 16, groups=4),
        nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)),
        nn.Flatten(), nn.Linear(16 * 6 * 6, 32), make_norm("en_g8", 32),
        nn.Linear(32, 10), make_norm("bn", 10))


def test_fuse_removes_fusable_norms_and_keeps_outputs():
    torch.manual_seed(5)
    model = fused_pair_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, 8, 8))
    fused = fuse(model)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert kinds.count("HeteroNorm") == 1 and kinds.count("SwitchableNorm") == 0
    assert kinds.count("BatchNorm2d") == 0 and model.training
    assert isinstance(fused[7], HeteroNorm) and fused[7].norm_name == "gn"
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-5, atol=1e-5)


class _StandardizedConv(nn.Conv2d):
    """A weight-standardized conv (as timm's StdConv2d): its forward rescales the weight."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


@pytest.mark.parametrize("make", [
    lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 8, 3)),
    lambda: nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3)),
    lambda: nn.utils.spectral_norm(nn.Conv2d(3, 8, 3)),
    lambda: _StandardizedConv(3, 8, 3),
    lambda: nn.Conv2d(3, 8, 3),  # the control: folded
])
def test_fuse_keeps_the_norm_of_a_layer_that_computes_its_weight(make):
    torch.manual_seed(3)
    model = nn.Sequential(make(), make_norm("hn", 8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.BatchNorm2d(8))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 1)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want, got = model(x), fuse(model)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kinds = [type(m).__name__ for m in fuse(model)]
    plain = type(model[0]) is nn.Conv2d and not nn.utils.parametrize.is_parametrized(model[0]) \
        and not model[0]._forward_pre_hooks
    assert kinds[1] == ("Identity" if plain else "HeteroNorm")
    assert kinds[4] == "Identity"  # the plain conv's BatchNorm beside it is folded


def test_fuse_leaves_per_example_norms():
    model = nn.Sequential(nn.Linear(4, 8), make_norm("ln", 8), nn.Linear(8, 8),
                          make_norm("bn+in+ln", 8))
    fused = fuse(model)
    assert [type(m).__name__ for m in fused] == ["Linear", "HeteroNorm", "Linear",
                                                 "SwitchableNorm"]


class _SharedUse(nn.Module):
    """A Linear that feeds a norm in a block and is also called on its own."""

    def __init__(self, shared):
        super().__init__()
        self.block = nn.Sequential(shared, make_norm("hn", 4))
        self.other = shared

    def forward(self, x):
        return self.block(x) + self.other(x)


def _tied():
    """Two Linears that share one weight (and one bias), each before a norm."""
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight, second.bias = first.weight, first.bias
    return nn.Sequential(nn.Sequential(first, make_norm("hn", 4)),
                         nn.Sequential(second, make_norm("bn", 4)))


@pytest.mark.parametrize("make", [
    # one Linear before two norms
    lambda shared: nn.Sequential(nn.Sequential(shared, make_norm("hn", 4)),
                                 nn.Sequential(shared, make_norm("bn+en", 4))),
    _SharedUse,
    lambda shared: _tied(),
])
def test_fuse_leaves_a_layer_used_in_more_than_one_place(make):
    # folding a norm's scale into such a layer changed its other uses (off by 0.7)
    torch.manual_seed(9)
    model = make(nn.Linear(4, 4))
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(8, 4) * 3 + 1)
    model.eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    reference = copy.deepcopy(model).double()  # unfused, in float64
    fused = fuse(model)
    with torch.no_grad():
        torch.testing.assert_close(fused.double()(x), reference(x), rtol=1e-5, atol=1e-5)
    norms = [m for m in fused.modules() if is_norm_layer(m)]
    assert len(norms) == sum(is_norm_layer(m) for m in model.modules())  # none folded


def test_fuse_folds_a_block_shared_as_a_whole():
    # every use of a shared Sequential passes through the same norm: folding stays exact
    torch.manual_seed(10)
    block = nn.Sequential(nn.Linear(4, 4), make_norm("hn", 4))
    model = nn.Sequential(block, nn.ReLU(), block)
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(8, 4) * 3 + 1)
    model.eval()
    x = torch.randn(8, 4)
    fused = fuse(model)
    assert isinstance(fused[0][1], nn.Identity) and fused[0] is fused[2]
    scale, shift = model[0][1].inference_affine()
    linear = model[0][0]
    with torch.no_grad():
        inner = torch.relu((x @ linear.weight.T + linear.bias) * scale + shift)
        want = (inner @ linear.weight.T + linear.bias) * scale + shift
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bn", "hn", "hn_g4", "en_g2", "bn+en"])
def test_convert_keeps_affine_and_maps_running_statistics(name):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.2),
                          nn.Sequential(nn.Conv2d(8, 8, 1), nn.SyncBatchNorm(8)))
    bn = model[1]
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    model.train()
    for _ in range(3):
        model[:2](torch.randn(4, 3, 6, 6))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    reference = {"eval": model[:2].eval()(x := torch.randn(2, 3, 6, 6))}
    with pytest.warns(StatscopeWarning, match=r"'2\.1' is a SyncBatchNorm; the replacement "
                                              r"normalizes each process's own batch"):
        converted = convert(model, name)
    layer = converted[1]
    assert is_norm_layer(layer) and is_norm_layer(converted[2][1])
    assert layer.momentum == 0.2 and not layer.training
    torch.testing.assert_close(layer.weight, bn.weight)
    if not name.startswith("en"):
        torch.testing.assert_close(layer.running_mean, rm)
    assert int(layer.num_batches_tracked) == 3
    groups = {"hn_g4": 4, "en_g2": 2}.get(name, 1)
    grouped_rm = rm.reshape(groups, -1).mean(1, keepdim=True)
    expected_ext = (rv.reshape(groups, -1) + (rm.reshape(groups, -1) - grouped_rm) ** 2).mean(1)
    expected_ext = expected_ext.repeat_interleave(8 // groups)
    if name == "bn":
        torch.testing.assert_close(layer.running_var, rv)
        torch.testing.assert_close(converted[:2](x), reference["eval"])
    elif name == "bn+en":
        torch.testing.assert_close(layer.running_var, rv)
        torch.testing.assert_close(layer.running_var_extended, expected_ext)
    else:
        torch.testing.assert_close(layer.running_var, expected_ext)
    if name.startswith("en"):
        torch.testing.assert_close(layer.running_mean,
                                   grouped_rm.expand(groups, 8 // groups).reshape(-1))


def test_convert_warns_only_where_a_syncbatchnorm_loses_its_sync():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), "hn")  # nothing to say
    with pytest.warns(StatscopeWarning, match=r"'0', '1\.0' are SyncBatchNorms"):
        convert(nn.Sequential(nn.SyncBatchNorm(4), nn.Sequential(nn.SyncBatchNorm(4))), "bn")
    with pytest.warns(StatscopeWarning, match="the model is a SyncBatchNorm"):
        layer = convert(nn.SyncBatchNorm(4), "hn")
    assert isinstance(layer, HeteroNorm)


def test_convert_root_batchnorm():
    layer = convert(nn.BatchNorm1d(6), "hn", std_center="subtracted")
    assert isinstance(layer, HeteroNorm) and layer.std_center == "subtracted"


def test_convert_keeps_the_batchnorms_parameters():
    # as convert_sync_batchnorm: an optimizer made before convert still trains γ and β, and a
    # frozen BatchNorm stays frozen
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8))
    model[3].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gamma = model[1].weight
    convert(model, "hn")
    assert model[1].weight is gamma and not model[3].weight.requires_grad
    before = gamma.detach().clone()
    frozen = model[3].weight.detach().clone()
    model(torch.randn(6, 4)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)  # trained through the old optimizer
    assert torch.equal(model[3].weight, frozen) and model[3].weight.grad is None
    # another dtype asked for: copies, still frozen where the original was
    model = nn.Sequential(nn.BatchNorm1d(8), nn.BatchNorm1d(8))
    model[1].requires_grad_(False)
    convert(model, "hn", dtype=torch.float64)
    assert model[0].weight.dtype == torch.float64 and model[0].weight.requires_grad
    assert not model[1].weight.requires_grad and not model[1].bias.requires_grad


def test_convert_of_a_lazy_batchnorm_before_its_first_forward_says_so():
    model = nn.Sequential(nn.Linear(4, 8), nn.LazyBatchNorm1d())
    with pytest.raises(StatscopeError, match=r"layer '1' is a LazyBatchNorm1d that has not seen "
                                             r"an input yet.*run one forward"):
        convert(model, "hn")
    model(torch.randn(3, 4))
    assert isinstance(convert(model, "hn")[1], HeteroNorm)


@pytest.mark.parametrize(("late", "kw", "said"), [
    (nn.BatchNorm2d(16, eps=0.0), {}, r"layer '2.1' \(BatchNorm2d\(16, eps=0.0\)\): eps=0.0"),
    (nn.BatchNorm2d(12), {"groups": 8}, r"layer '2.1' .*groups=8: num_features=12"),
])
def test_convert_changes_nothing_when_a_layer_cannot_be_converted(late, kw, said):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16),
                          nn.Sequential(nn.Conv2d(16, 16, 3), late))
    before = [type(m) for m in model.modules()]
    with pytest.raises(StatscopeError, match=said):
        convert(model, "gn" if kw else "hn", **kw)
    assert [type(m) for m in model.modules()] == before  # the first BatchNorm was not replaced
    fixed = convert(model, "gn" if kw else "hn", **{**kw, "groups": 4} if kw else {"eps": 1e-5})
    assert sum(isinstance(m, HeteroNorm) for m in fixed.modules()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hn", "sn"])
def test_torch_compile_gives_same_outputs(name):
    torch.manual_seed(7)
    eager, compiled_layer = make_norm(name, 8), make_norm(name, 8)
    compiled = torch.compile(compiled_layer)
    for _ in range(2):
        x = torch.randn(4, 8, 5, 5, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = eager(x), compiled(x2)
        torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        y2.square().sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)


def test_torch_compile_eager_backend_gives_same_outputs():
    torch.manual_seed(8)
    eager = make_norm("bn+en", 8)
    compiled = torch.compile(make_norm("bn+en", 8), backend="aot_eager")
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(compiled(x), eager(x))


def test_nn_imports_only_torch_and_the_kernel():
    # statscope.native builds the C++ kernels the layers train through on small CPU inputs
    allowed = {"torch", "statscope.errors", "statscope.native", "math", "re", "copy",
               "dataclasses", "typing", "numbers", "warnings"}
    for path in pathlib.Path(snn.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] == "torch" or name in allowed or \
                    name.startswith("statscope.nn"), f"{path.name} imports {name}"


def test_public_api_is_documented_with_examples():
    assert set(snn.__all__) == {"HeteroNorm", "SwitchableNorm", "make_norm", "NORM_NAMES",
                                "PIXEL_SETS", "convert", "fuse", "is_norm_layer"}
    for name in snn.__all__:
        obj = getattr(snn, name)
        if callable(obj):
            assert "Example" in (obj.__doc__ or ""), f"{name} has no doctest example"
