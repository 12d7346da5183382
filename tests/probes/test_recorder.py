"""The recorder's behaviour: steps, selection, hooks, scalars, failures and bad input."""


import subprocess
import sys
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import statscope
from statscope.probes import select
from statscope.errors import NonFiniteWarning, StatscopeError, StatscopeWarning, StoreError
from statscope.store import open_windows, verify_run


def fc(c=6):
    return nn.Sequential(nn.Linear(5, c), nn.BatchNorm1d(c), nn.ReLU(), nn.Linear(c, 3),
                         nn.BatchNorm1d(3))


def batches(n, bs=4, seed=0, dim=5):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, dim, generator=gen) for _ in range(n)]


def inputs_of(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    return seen, handle


def test_default_probes_are_norm_inputs_and_match_recomputation(tmp_path):
    model = fc()
    seen, handle = inputs_of(model[1])
    with statscope.record(model, tmp_path / "r", block_steps=4, meta={"batch_size": 4}) as rec:
        for i, x in enumerate(batches(11)):
            model(x).sum().backward()
            assert rec.current_step == i
            rec.log(loss=torch.tensor(float(i)), lr=0.5)
        rec.set_attrs(test_accuracy=[0.5, 0.75])
        with pytest.raises(StatscopeError, match="set_attrs\\(status=...\\)"):
            rec.set_attrs(status="done")
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["layers"] == ["1", "4"] and ds.attrs["status"] == "completed"
    assert ds.step.values.tolist() == list(range(11))
    assert ds.attrs["meta"] == {"batch_size": 4}
    assert ds.attrs["test_accuracy"] == [0.5, 0.75]
    want = np.stack([s.mean(0).numpy() for s in seen])
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "1").values, want, atol=1e-6)
    np.testing.assert_array_equal(ds.loss.values, np.arange(11.0))
    probes = ds.attrs["probes"]
    assert probes[0]["type"] == "BatchNorm1d" and probes[0]["norm"]["momentum"] == 0.1
    np.testing.assert_array_equal(ds.running_var0.values, np.ones(9, np.float32))
    assert "forward" not in model[1].__dict__ and "forward" not in model.__dict__


def test_model_without_norms_probes_linear_outputs(tmp_path):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with statscope.record(model, tmp_path / "r"):
        model(torch.randn(3, 5))
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["layers"] == ["0", "2"]
    assert [p["where"] for p in ds.attrs["probes"]] == ["output", "output"]


def test_layer_selection_by_glob_type_and_both_ends(tmp_path):
    model = fc()
    targets = statscope.probes.select(model, [nn.Linear], where=("input", "output"))
    assert [t.name for t in targets] == ["0:in", "0:out", "3:in", "3:out"]
    assert [t.name for t in statscope.probes.select(model, "[14]")] == ["1", "4"]
    with pytest.raises(StatscopeError, match=r"layers='fc9': no such module; available: 0, 1, 2"):
        statscope.record(model, tmp_path / "r", layers=["fc9"])
    with pytest.raises(StatscopeError, match="where='inside'"):
        statscope.record(model, tmp_path / "r", where="inside")


class LlamaRMSNorm(nn.Module):
    """The shape of Hugging Face's RMSNorms (Llama, Qwen, Mistral, Gemma): torch's is not used."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class PreLayerNorm(nn.Module):
    """A block named like a norm that holds none of its own: not a norm layer."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return self.fn(self.norm(x))


@pytest.mark.parametrize("norm", [nn.LayerNorm, LlamaRMSNorm])
def test_sequence_inputs_use_the_last_dim_for_layernorm(tmp_path, norm):
    model = nn.Sequential(nn.Linear(5, 6), norm(6))
    x = torch.randn(2, 7, 5)
    seen, handle = inputs_of(model[1])
    with statscope.record(model, tmp_path / "r"):
        model(x)
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    np.testing.assert_allclose(ds.bn_std.values[0], seen[0].reshape(-1, 6).std(0, correction=0).numpy(),
                               rtol=1e-5)
    assert ds["count"].values[0, 0] == 14


def test_other_libraries_layernorms_and_rmsnorms_are_norm_layers():
    # recorded like torch's: test_sequence_inputs_use_the_last_dim_for_layernorm
    model = nn.Sequential(nn.Linear(5, 6), LlamaRMSNorm(6), PreLayerNorm(6))
    targets = select(model)
    assert [(t.name, t.channel_dim, t.channels) for t in targets] == [("1", -1, 6),
                                                                      ("2.norm", -1, 6)]


def test_hugging_face_models_are_probed_at_their_own_norm_layers(tmp_path):
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_key_value_heads=2))
    assert {type(t.module).__name__ for t in select(llama)} == {"LlamaRMSNorm"}
    convnext = transformers.ConvNextModel(transformers.ConvNextConfig(
        num_stages=2, hidden_sizes=[4, 8], depths=[1, 1], image_size=32))
    dims = {t.module_name: t.channel_dim for t in select(convnext)}
    # channels_first in the stem and between stages, channels_last inside the blocks
    assert dims["embeddings.layernorm"] == 1 and dims["encoder.stages.0.layers.0.layernorm"] == -1
    x = torch.randn(2, 3, 32, 32)
    stem = convnext.embeddings.layernorm
    seen, handle = inputs_of(stem)
    with statscope.record(convnext, tmp_path / "c"):
        convnext(pixel_values=x)
    handle.remove()
    ds = statscope.open_run(tmp_path / "c")
    want = seen[0].movedim(1, -1).reshape(-1, 4)
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "embeddings.layernorm").values[0],
                               want.mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_eval_forwards_are_skipped_unless_asked(tmp_path):
    model = fc()
    with statscope.record(model, tmp_path / "a"):
        model(torch.randn(4, 5))
        model.eval()
        model(torch.randn(4, 5))
        model.train()
        model(torch.randn(4, 5))
    assert statscope.open_run(tmp_path / "a").sizes["step"] == 2
    with statscope.record(model, tmp_path / "b", record_eval=True):
        model.eval()
        model(torch.randn(4, 5))
    assert statscope.open_run(tmp_path / "b").sizes["step"] == 1


@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
def test_a_model_in_eval_mode_with_a_probed_layer_in_training_mode_counts_steps(tmp_path,
                                                                               mechanism):
    # fine-tuning with a frozen backbone: model.eval(), then model.head.train(); the step
    # boundary looked at the model's own mode only, and every step merged into the first
    model = fc()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, handle = inputs_of(model[4])
    model.eval()
    model[4].train()
    # the frozen layer ran in every training forward, in eval mode: said so, not "never ran"
    with pytest.warns(StatscopeWarning, match=r"1 of 2 probed layers ran only in eval mode in the "
                      r"5 recorded steps: '1'.*record_eval=True"), \
            statscope.record(model, tmp_path / "r", mechanism=mechanism, block_steps=2):
        for x in batches(5):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            model[4].eval()  # a validation forward, every layer in eval mode: no step
            with torch.no_grad():
                model(x)
            model[4].train()
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 5
    assert (ds["count"].sel(layer="1").values == 0).all()  # the frozen layer
    want = np.stack([s.mean(0).numpy() for s in seen[::2]])  # the pre-hook saw both forwards
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "4").values, want, atol=1e-6)


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.spare = fc(), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.net(x)


def test_layers_never_called_and_layers_only_in_eval_mode_are_named_apart(tmp_path):
    model = Unused()
    model.net[1].eval()  # frozen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with statscope.record(model, tmp_path / "r", step="forward"):
            for x in batches(3):
                model(x)
    said = [str(w.message) for w in caught if issubclass(w.category, StatscopeWarning)]
    assert len(said) == 2, said
    assert re.search(r"1 of 3 probed layers ran only in eval mode in the 3 recorded steps: "
                     r"'net.1';.*frozen", said[0])
    assert re.search(r"1 of 3 probed layers never ran in the 3 recorded steps: 'spare';.* does "
                     r"not call", said[1])
    ds = statscope.open_run(tmp_path / "r")
    for never in ("net.1", "spare"):
        assert (ds["count"].sel(layer=never).values == 0).all()
    assert (ds["count"].sel(layer="net.4").values > 0).all()


@pytest.mark.parametrize("step", ["auto", "optimizer", "forward"])
def test_a_value_logged_before_the_first_forward_joins_the_first_step(tmp_path, step):
    # rec.log(lr=...) at the top of the loop, or from another thread: the first log made the
    # first forward end an empty step 0, every batch filed one step late (and under "auto" a
    # warning that forwards per step vary)
    model = fc()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, handle = inputs_of(model[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with statscope.record(model, tmp_path / "r", step=step, block_steps=4) as rec:
            for i, x in enumerate(batches(6)):
                rec.log(lr=float(i))
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 6 and (ds["count"].values == 4).all()
    want = np.stack([s.mean(0).numpy() for s in seen])
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "1").values, want, atol=1e-6)
    # a value logged after a step's forward and optimizer step belongs to that step (its
    # next forward ends it): the loop's lr=i lands in step i - 1, the first in step 0
    assert ds.lr.values[:5].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and np.isnan(ds.lr.values[5])


def test_a_logged_tensor_is_recorded_as_it_was_when_logged(tmp_path):
    # A running total kept in a tensor and updated in place (`total += loss.detach()`): the
    # recorder kept a reference and read it when the block was filed, so every step of a block
    # held the total of the block's last step. Also the dtypes a loop logs: float64, bf16, int.
    model = fc()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total = torch.zeros((), dtype=torch.float64)
    scale = nn.Parameter(torch.ones(1))
    want, halves = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with statscope.record(model, tmp_path / "r", block_steps=4) as rec:
            for i, x in enumerate(batches(6)):
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                total += loss.detach().double()
                half = loss.detach().to(torch.bfloat16).reshape(1)
                # a Parameter (a tensor subclass) takes the path of GPU tensors: a copy
                rec.log(total=total, half=half, seen=torch.tensor(i + 1), scale=scale)
                want.append(total.item())
                halves.append(float(half))
                with torch.no_grad():
                    scale.add_(1.0)
    ds = statscope.open_run(tmp_path / "r")
    np.testing.assert_array_equal(ds.total.values, want)
    np.testing.assert_array_equal(ds.half.values, halves)
    np.testing.assert_array_equal(ds.seen.values, np.arange(1.0, 7.0))
    np.testing.assert_array_equal(ds.scale.values, np.arange(1.0, 7.0))
    # a diverged loss is stored as it is and said once (NaN in the store also means "not
    # logged at that step", which alone would hide it)
    with pytest.warns(NonFiniteWarning) as said:
        with statscope.record(model, tmp_path / "n", block_steps=4) as rec:
            for i, x in enumerate(batches(10)):
                model(x).sum().backward()
                if i >= 5:
                    rec.log(loss=[float("inf"), 1.0, torch.tensor(float("nan"))][min(i - 5, 2)])
                if i == 7:
                    rec.log(loss=torch.tensor(-float("inf")))  # twice in a step: the last
    said = [w for w in said if issubclass(w.category, NonFiniteWarning)]
    assert len(said) == 1 and said[0].filename == __file__  # the loop's line, not statscope's
    said = [str(w.message) for w in said]
    assert said[0].startswith(
        "statscope: loss=inf logged at step 5 (2 non-finite of the 3 logged in that block)")
    assert "NaN also marks the steps where loss was not logged" in said[0]
    loss = statscope.open_run(tmp_path / "n").loss.values
    assert np.isnan(loss[:5]).all() and loss[5] == np.inf and loss[6] == 1.0
    assert loss[7] == -np.inf and np.isnan(loss[8:]).all()
    with pytest.raises(StatscopeError, match="log\\(z=...\\): a complex"):
        with statscope.record(model, tmp_path / "c") as rec:
            rec.log(z=torch.tensor(1 + 2j))


def test_manual_steps_take_the_first_forward_of_each_step(tmp_path):
    model = fc()
    xs = batches(6)
    with statscope.record(model, tmp_path / "r", step="manual") as rec:
        for i in range(3):
            model(xs[2 * i])
            model(xs[2 * i + 1])
            rec.step()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 3
    with torch.no_grad():
        first = model[0](xs[2]).double()
    np.testing.assert_allclose(ds.bn_mean.values[1, :6], first.mean(0).numpy(), atol=1e-6)
    with pytest.raises(StatscopeError, match="step='manual'"):
        with statscope.record(model, tmp_path / "s") as rec:
            rec.step()


def test_checkpoint_recompute_is_not_recorded_twice(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = fc()

        def forward(self, x):
            return checkpoint(self.body, x, use_reentrant=False)

    model = Net()
    with statscope.record(model, tmp_path / "r", step="manual") as rec:
        for x in batches(3):
            model(x).sum().backward()
            rec.step()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 3 and (ds["count"].values == 4).all()


@pytest.mark.parametrize("rule", ["auto", "forward", "manual"])
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_forwards_without_autograd_are_not_training_steps(tmp_path, rule, grad_off):
    # validation in training mode (or BatchNorm recalibration) before or after a step's
    # training forward: it filed its batch as the step's and, under the optimizer rule, made
    # the next training batch an unrecorded micro-batch of it
    torch.manual_seed(0)
    model = fc()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = batches(6, seed=1), batches(6, seed=2)
    seen = []
    handle = model[1].register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().double()) if torch.is_grad_enabled() else None)
    with statscope.record(model, tmp_path / "r", step=rule, block_steps=4) as rec:
        for x, v in zip(train, val):
            with grad_off():
                model(v)
            model(x).pow(2).mean().backward()
            if rule != "forward":
                opt.step()
                opt.zero_grad()
            with grad_off():
                model(v)
            rec.log(val=1.0)
            if rule == "manual":
                rec.step()
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 6 and len(seen) == 6
    np.testing.assert_array_equal(ds.val.values, np.ones(6))  # logged after validation, kept
    got = ds.bn_mean.sel(neuron=ds.layer == "1").values
    want = np.stack([s.mean(0).numpy() for s in seen])
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(ds.bn_std.sel(neuron=ds.layer == "1").values,
                               np.stack([s.std(0, unbiased=False).numpy() for s in seen]),
                               rtol=1e-5)


def test_a_gan_discriminator_records_its_own_batches_with_manual_steps(tmp_path):
    # docs/guide.md: under the optimizer rule the discriminator's forward in the generator's
    # update would open its next step; rec.step() at the end of each iteration keeps its own
    torch.manual_seed(0)
    gen, disc = nn.Sequential(nn.Linear(4, 5)), fc()
    og = torch.optim.SGD(gen.parameters(), lr=0.1)
    od = torch.optim.SGD(disc.parameters(), lr=0.1)
    seen, handle = inputs_of(disc[1])
    firsts = []
    with statscope.record(disc, tmp_path / "d", step="manual") as rec:
        for x in batches(5, bs=6, seed=3):
            fake = gen(torch.randn(6, 4))
            n = len(seen)
            (disc(x).mean() - disc(fake.detach()).mean()).backward()
            firsts.append(seen[n])  # the real batch's
            od.step()
            od.zero_grad()
            disc(fake).mean().backward()
            og.step()
            og.zero_grad()
            rec.step()
    handle.remove()
    ds = statscope.open_run(tmp_path / "d")
    assert ds.sizes["step"] == 5
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "1").values,
                               np.stack([f.mean(0).numpy() for f in firsts]), atol=1e-6)


def test_a_model_left_in_eval_mode_records_nothing_and_says_so(tmp_path):
    model = fc().eval()  # model.train() forgotten
    with pytest.warns(StatscopeWarning, match="no training step was recorded.*record_eval=True"):
        with statscope.record(model, tmp_path / "r"):
            for x in batches(3):
                model(x)
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 0


class Backbone(nn.Module):
    """A model trained through another method than forward (timm's forward_features, CLIP's
    encode_image)."""

    def __init__(self):
        super().__init__()
        self.features = fc()
        self.head = nn.Linear(3, 2)

    def forward_features(self, x):
        return self.features(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


@pytest.mark.parametrize("rule", ["auto", "optimizer"])
def test_layers_run_without_the_models_forward_still_end_a_step_per_optimizer_step(tmp_path,
                                                                                 rule):
    # the step ended only at the model's next forward, which never came: ten steps were
    # filed as one (the first batch), without a word. Values logged after the optimizer step
    # still belong to the step it ended, as with the model's forward
    torch.manual_seed(0)
    model, head = Backbone(), nn.Linear(3, 4)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    seen, handle = inputs_of(model.features[1])
    with statscope.record(model, tmp_path / "r", step=rule, block_steps=4) as rec:
        for x in batches(10, bs=6):
            for micro in x.split(3):  # gradient accumulation: the first is recorded
                head(model.forward_features(micro)).sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # validation, also around the model's forward
                model.forward_features(x)
            rec.log(loss=float(len(seen)))
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 10 and ds.attrs["step_rule"] == "optimizer"
    np.testing.assert_array_equal(ds.loss.values, 3 * np.arange(1, 11))
    firsts = [s for s in seen if s.shape[0] == 3][::2]
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "features.1").values,
                               np.stack([f.mean(0).numpy() for f in firsts]), atol=1e-6)
    assert (ds["count"].values == 3).all()


def test_layers_run_without_the_models_forward_keep_a_step_that_gradscaler_skipped(tmp_path):
    # the step ends at the first probed layer after the optimizer step; a skipped optimizer
    # step fires no hook, but its discarded gradients say where the next step begins
    torch.manual_seed(0)
    model, head = Backbone(), nn.Linear(3, 4)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    seen, handle = inputs_of(model.features[1])
    with statscope.record(model, tmp_path / "r", step="optimizer", block_steps=4) as rec:
        for i, x in enumerate(batches(10, bs=6)):
            for k, micro in enumerate(x.split(3)):  # gradient accumulation
                loss = head(model.forward_features(micro)).pow(2).mean()
                scaler.scale(loss * (float("inf") if i in (0, 4, 5) and k == 0 else 1)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            rec.log(iteration=i)
    handle.remove()
    assert scaler.get_scale() == 2.0 ** 13  # three skipped steps halved it three times
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 10
    np.testing.assert_array_equal(ds.iteration.values, np.arange(10))
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "features.1").values,
                               np.stack([f.mean(0).numpy() for f in seen[::2]]), atol=1e-6)


def test_layers_run_without_the_models_forward_keep_every(tmp_path):
    # every=3: the probes of a step left out returned before they could end the step before,
    # and the first left-out step never ended
    torch.manual_seed(0)
    model = Backbone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, handle = inputs_of(model.features[1])
    with statscope.record(model, tmp_path / "r", every=3, block_steps=2):
        for x in batches(10):
            model.forward_features(x).sum().backward()
            opt.step()
            opt.zero_grad()
    handle.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == [0, 3, 6, 9]
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "features.1").values,
                               np.stack([seen[i].mean(0).numpy() for i in (0, 3, 6, 9)]),
                               atol=1e-6)


def test_layers_run_without_the_models_forward_or_an_optimizer_are_said_to_merge(tmp_path):
    model = Backbone()
    with pytest.warns(StatscopeWarning, match="forwards could not be told apart"):
        with statscope.record(model, tmp_path / "r"):
            for x in batches(3):
                model.forward_features(x).sum().backward()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 1


def test_record_eval_records_forwards_without_autograd(tmp_path):
    model = fc()
    with statscope.record(model, tmp_path / "r", step="forward", record_eval=True):
        with torch.no_grad():
            for x in batches(3):
                model(x)
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 3


def test_reentrant_checkpoint_layers_are_recorded(tmp_path):
    # a reentrant checkpoint runs its layers without autograd inside a training forward
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = fc()

        def forward(self, x):
            return checkpoint(self.body, x, use_reentrant=True)

    model = Net()
    xs = [x.requires_grad_() for x in batches(3)]
    with statscope.record(model, tmp_path / "r", step="forward"):
        for x in xs:
            model(x).sum().backward()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 3 and (ds["count"].values == 4).all()
    with torch.no_grad():
        want = np.stack([model.body[0](x).double().mean(0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "body.1").values, want,
                               atol=1e-5)


def test_compiled_model_records_same_values_as_eager(tmp_path):
    xs = batches(4)
    torch.manual_seed(0)
    eager = fc()
    torch.manual_seed(0)
    compiled = fc()
    with statscope.record(eager, tmp_path / "e"):
        for x in xs:
            eager(x)
    with statscope.record(compiled, tmp_path / "c"):  # closed also when compiling fails
        fast = torch.compile(compiled)
        for x in xs:
            fast(x)
    a, b = statscope.open_run(tmp_path / "e"), statscope.open_run(tmp_path / "c")
    np.testing.assert_allclose(a.bn_std.values, b.bn_std.values, rtol=1e-5)


_COMPILED_UNDER_W_ERROR = """
import sys, numpy as np, torch, statscope
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4),
                      nn.LayerNorm(4))
xs = [torch.randn(8, 5) for _ in range(3)]
with statscope.record(model, sys.argv[1]):
    fast = torch.compile(model, backend="eager")
    for x in xs:
        fast(x).sum().backward()
ds = statscope.open_run(sys.argv[1])
first = model[0](xs[0]).detach().double().numpy()  # weights unchanged: no optimizer
np.testing.assert_allclose(ds.bn_mean.values[0, :6], first.mean(0), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(ds.bn_std.values[0, :6], first.std(0), rtol=1e-5)
leaf = torch.ones(2, requires_grad=True)
try:
    (leaf * 2).grad  # the same warning from user code still is an error
except UserWarning:
    print("OK")
"""


def test_compiled_model_records_under_warnings_as_errors(tmp_path):
    # at a graph break dynamo reads .grad of the non-leaf tensors crossing it, and torch's own
    # warning about that fails compilation under -W error: probes must not break the graph
    out = subprocess.run([sys.executable, "-W", "error", "-c", _COMPILED_UNDER_W_ERROR,
                          str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_smaller_last_batch_and_layers_that_skip_a_step(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x, use_b):
            return self.b(x) if use_b else self.a(x)

    model = Branchy()
    sizes = [4, 4, 2, 4, 3]
    with statscope.record(model, tmp_path / "r", block_steps=3):
        for i, n in enumerate(sizes):
            model(torch.randn(n, 3), i % 2 == 1)
    ds = statscope.open_run(tmp_path / "r")
    count = ds["count"].values
    assert count[:, 0].tolist() == [4, 0, 2, 0, 3]
    assert count[:, 3].tolist() == [0, 4, 0, 4, 0]
    assert np.isnan(ds.bn_mean.values[1, :3]).all() and np.isfinite(ds.bn_mean.values[0, :3]).all()
    assert ds.attrs["nonfinite"] == {}


def test_nonfinite_statistics_are_kept_counted_and_warned_once(tmp_path):
    model = nn.Sequential(nn.BatchNorm1d(2))
    with pytest.warns(NonFiniteWarning) as caught:
        with statscope.record(model, tmp_path / "r", block_steps=1):
            for _ in range(3):
                model(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    assert len([w for w in caught if issubclass(w.category, NonFiniteWarning)]) == 1
    ds = statscope.open_run(tmp_path / "r")
    assert np.isnan(ds.bn_mean.values[:, 1]).all() and np.isfinite(ds.bn_mean.values[:, 0]).all()
    assert ds.attrs["nonfinite"]["bn_mean"] == 3


def test_an_error_in_training_marks_the_run_failed_and_removes_hooks(tmp_path):
    model = fc()
    with pytest.raises(RuntimeError, match="boom"):
        with statscope.record(model, tmp_path / "r"):
            model(torch.randn(4, 5))
            raise RuntimeError("boom")
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["status"] == "failed" and "boom" in ds.attrs["error"]
    assert ds.sizes["step"] == 1
    assert "forward" not in model[1].__dict__


def raising_before(module):
    """A switch that makes ``module``'s forward raise, as an out-of-memory batch would."""
    def boom(m, args):
        if boom.on:
            raise RuntimeError("out of memory (injected)")
    boom.on = False
    module.register_forward_pre_hook(boom)
    return boom


@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
@pytest.mark.parametrize("rule", ["auto", "forward"])
def test_a_forward_that_raises_is_not_filed_with_the_next_batch(tmp_path, mechanism, rule):
    # a loop that skips a batch whose forward raised (OOM): the layers it reached were filed
    # with the next batch's other layers in one step (and under the optimizer rule the skipped
    # forward counted as a micro-batch, with a warning that forwards per step vary)
    torch.manual_seed(0)
    model = fc()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen1, h1 = inputs_of(model[1])
    seen4, h4 = inputs_of(model[4])
    boom = raising_before(model[3])
    fail = {2, 5, 6}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with statscope.record(model, tmp_path / "r", step=rule, mechanism=mechanism,
                              block_steps=3) as rec:
            for i, x in enumerate(batches(9)):
                boom.on = i in fail
                try:
                    model(x).sum().backward()
                except RuntimeError:
                    opt.zero_grad()
                    continue
                opt.step()
                opt.zero_grad()
                rec.log(batch=float(i))
    h1.remove(), h4.remove()
    ds = statscope.open_run(tmp_path / "r")
    done = [i for i in range(9) if i not in fail]
    assert ds.step.values.tolist() == list(range(6)) and ds.batch.values.tolist() == done
    assert ds.attrs["step_rule"] == ("optimizer" if rule == "auto" else "forward")
    for layer, seen in (("1", [seen1[i] for i in done]), ("4", seen4)):
        want = np.stack([s.mean(0).numpy() for s in seen])
        np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == layer).values, want,
                                   atol=1e-6)


def test_a_raising_micro_batch_leaves_the_step_its_other_micro_batches(tmp_path):
    torch.manual_seed(0)
    model = fc()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen4, h4 = inputs_of(model[4])
    boom = raising_before(model[3])
    xs = iter(batches(12))
    # the steps finished 3, 2, 2 and 2 forwards
    with pytest.warns(StatscopeWarning, match="forwards per optimizer step vary"), \
            statscope.record(model, tmp_path / "r", step="optimizer", block_steps=2):
        for step in range(4):
            for micro in range(3):
                boom.on = (step, micro) in {(1, 0), (2, 1), (3, 2)}
                try:
                    model(next(xs)).sum().backward()
                except RuntimeError:
                    pass
            opt.step()
            opt.zero_grad()
    h4.remove()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 4
    # the first forward that finished in each step: micro-batches 0, 1, 0, 0
    first = [0, 3, 5, 7]
    want = np.stack([seen4[i].mean(0).numpy() for i in first])
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "4").values, want, atol=1e-6)
    # layer 1 ran in the raising forwards too: at step 1 it was discarded with its batch
    assert (ds["count"].sel(layer="1").values == 4).all()


@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
def test_a_raising_last_forward_that_the_loop_survives_is_not_a_step(tmp_path, mechanism):
    model = fc()
    boom = raising_before(model[3])
    xs = batches(3)
    with statscope.record(model, tmp_path / "r", step="forward", mechanism=mechanism):
        model(xs[0])
        model(xs[1])
        boom.on = True
        with pytest.raises(RuntimeError, match="out of memory"):
            model(xs[2])
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["status"] == "completed" and ds.sizes["step"] == 2
    assert (ds["count"].values == 4).all()


def test_a_run_that_ends_in_a_raising_forward_keeps_the_batch_it_failed_on(tmp_path):
    model = fc()
    boom = raising_before(model[3])
    xs = batches(2)
    with pytest.raises(RuntimeError, match="out of memory"):
        with statscope.record(model, tmp_path / "r"):
            model(xs[0])
            boom.on = True
            model(xs[1])
    ds = statscope.open_run(tmp_path / "r")
    assert ds.attrs["status"] == "failed" and ds.sizes["step"] == 2
    assert ds["count"].sel(layer="4").values[:, 0].tolist() == [4, 0]
    with torch.no_grad():
        want = model[0](xs[1]).double().mean(0).numpy()
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "1").values[1], want, atol=1e-6)


def test_dataparallel_on_one_device_is_looked_through_and_on_several_refused(tmp_path):
    model = fc()
    dp = nn.DataParallel(model)  # no GPU: DataParallel calls the module itself
    with statscope.record(dp, tmp_path / "one", step="forward"):
        dp(batches(1)[0])
    assert statscope.open_run(tmp_path / "one").attrs["layers"] == ["1", "4"]
    # several devices: the replicas DataParallel makes at every forward are shallow copies of
    # each module; they would share the wrapped forwards, bound to the original module
    dp.device_ids = [0, 1]
    with pytest.raises(StatscopeError, match=r"DataParallel\(device_ids=\[0, 1\]\).*"
                                             "DistributedDataParallel"):
        statscope.record(dp, tmp_path / "two")
    assert "forward" not in model[1].__dict__


def test_bad_input(tmp_path):
    model = fc()
    with statscope.record(model, tmp_path / "r"):
        model(torch.randn(4, 5))
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        statscope.record(model, tmp_path / "r")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a statscope run"):
        statscope.record(model, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(StatscopeError, match="model=int"):
        statscope.record(3, tmp_path / "x")
    with pytest.raises(StatscopeError, match="en_groups=4 for '1': its 6 channels"):
        statscope.record(model, tmp_path / "x", en_groups=4)
    flat = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(StatscopeError, match=r"has shape \(3,\), which has no channel dimension"):
        with statscope.record(flat, tmp_path / "y"):
            flat(torch.randn(5))
    with pytest.raises(StatscopeError, match="log\\(loss=...\\): a tensor of shape \\(2,\\)"):
        with statscope.record(model, tmp_path / "z") as rec:
            rec.log(loss=torch.ones(2))
    with pytest.raises(StatscopeError, match="'count' is reserved"):
        with statscope.record(model, tmp_path / "w", block_steps=1) as rec:
            model(torch.randn(4, 5))
            rec.log(count=1.0)
    assert statscope.open_run(tmp_path / "w").sizes["step"] == 1


@pytest.mark.parametrize(("kw", "said"), [
    ({"overwrite": "no"}, "overwrite='no': expected True or False"),
    ({"record_eval": 1}, "record_eval=1: expected True or False"),
    ({"neurons": ("random", 3, -1)}, r"neurons=\('random', 3, -1\)"),
    ({"channel_dim": "x"}, "channel_dim='x' for '1': expected an integer"),
    ({"meta": [1, 2]}, r"meta=\[1, 2\]: expected a mapping"),
    ({"neurons": {"typo.*": 2}}, r"neurons=\{'typo.\*': ...\}: 'typo.\*' matches none of the "
                                 "probed layers: 1"),
    ({"en_groups": {"typo": 3}}, "en_groups=.*'typo' matches none"),
    ({"channel_dim": {"0": 1}}, "channel_dim=.*'0' matches none"),
])
def test_bad_arguments_are_refused_by_name_and_the_run_is_kept(tmp_path, kw, said):
    # overwrite="no" replaced a 5-step run; the others raised Python's errors or, for a
    # mistyped key, left the setting silently off (an outside check)
    model = fc()
    with statscope.record(model, tmp_path / "r", step="forward"):
        for x in batches(5):
            model(x)
    with pytest.raises(StatscopeError, match=said):
        statscope.record(model, tmp_path / "r", **{"resume": True, **kw})
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 5
    statscope.record(model, tmp_path / "ok", neurons={"1": 2}, en_groups={nn.BatchNorm1d: 3})


def test_torchscript_modules_are_refused_or_said_to_go_unrecorded(tmp_path):
    # TorchScript runs its forward in C++: no Python hook of a probe would ever run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates TorchScript; tracing warns
        scripted, traced = torch.jit.script(fc()), torch.jit.trace(fc(), torch.randn(4, 5))
        mixed = nn.Sequential(fc(), torch.jit.script(nn.Sequential(nn.Linear(3, 5), fc())))
    with pytest.raises(StatscopeError, match="model=RecursiveScriptModule: a TorchScript "):
        statscope.record(scripted, tmp_path / "s")
    with pytest.raises(StatscopeError, match="model=TopLevelTracedModule: a TorchScript "):
        statscope.record(traced, tmp_path / "t")
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    with pytest.warns(StatscopeWarning, match="'1' is a TorchScript module .* not recorded") as w:
        rec = statscope.record(mixed, tmp_path / "m", step="forward")
    assert w[0].filename == __file__  # the user's line
    with rec:
        mixed(torch.randn(4, 5))
    assert statscope.open_run(tmp_path / "m").attrs["layers"] == ["0.1", "0.4"]


def test_resume_continues_after_the_last_step(tmp_path):
    model = fc()
    with statscope.record(model, tmp_path / "r"):
        for x in batches(5):
            model(x)
    with statscope.record(model, tmp_path / "r", resume=True) as rec:
        assert rec.current_step == 5
        for x in batches(3, seed=1):
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(8))
    with pytest.raises(StoreError, match="layers"):
        statscope.record(nn.Sequential(nn.BatchNorm1d(6)), tmp_path / "r", resume=True).start()
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 8


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_resume_completed_false_refuses_a_completed_run_and_changes_nothing(tmp_path, writer):
    model = fc()
    with statscope.record(model, tmp_path / "r", writer=writer):
        for x in batches(5):
            model(x)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "r").rglob("*"))
              if p.is_file() and p.name != "lease"}
    rec = statscope.record(model, tmp_path / "r", resume=True, resume_completed=False,
                           writer=writer)
    with pytest.raises(statscope.RunCompletedError, match=r"the run is completed \(5 steps"):
        rec.start()
    after = {p: p.read_bytes() for p in sorted((tmp_path / "r").rglob("*"))
             if p.is_file() and p.name != "lease"}
    assert after == before
    with statscope.record(model, tmp_path / "r", resume=True, writer=writer):  # the default
        model(batches(1, seed=1)[0])
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(6)) and ds.attrs["status"] == "completed"


def _bn_means(xs, model):
    """bn_mean of the first BatchNorm for batches ``xs``, from the Linear before it, in float64."""
    with torch.no_grad():
        return np.stack([model[0](x).double().mean(0).numpy() for x in xs])


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_resume_at_a_checkpoint_step_drops_the_later_rows(tmp_path, writer):
    # a loop killed after its checkpoint at step 40, whose store had committed steps up to 59,
    # restarts at 40: the store must hold its new batches from step 40, not from 60
    model = fc()
    first, again = batches(60), batches(25, seed=1)
    first[50] = first[50] * float("inf")  # a non-finite statistic in a dropped row
    kw = {"step": "forward", "window_steps": 16, "writer": writer}
    with pytest.warns(NonFiniteWarning):
        with statscope.record(model, tmp_path / "r", **kw):
            for x in first:
                model(x)
    assert statscope.open_run(tmp_path / "r").attrs["nonfinite"]
    with statscope.record(model, tmp_path / "r", resume=40, **kw) as rec:
        assert rec.current_step == 40
        for x in again:
            model(x)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.step.values.tolist() == list(range(65))
    assert not ds.attrs["nonfinite"]  # the inf of step 50 went with its row
    want = np.concatenate([_bn_means(first[:40], model), _bn_means(again, model)])
    np.testing.assert_allclose(ds.bn_mean.values[:, :6], want, rtol=1e-5, atol=1e-6)
    win = open_windows(tmp_path / "r")
    assert win.step.values.tolist() == [0, 16, 32, 48, 64]
    np.testing.assert_allclose(win.bn_mean.sel(summary="mean").values[2, :6],
                               want[32:48].mean(0), rtol=1e-5, atol=1e-6)  # old rows and new
    assert verify_run(tmp_path / "r") == []


def test_resume_at_a_step_keeps_the_windows_by_the_runs_own_length(tmp_path):
    # the window summaries are the run's: a resumed recorder asking for other windows (or none)
    # neither drops nor miscounts the stored ones when it cuts the run back
    model = fc()
    with statscope.record(model, tmp_path / "r", step="forward", window_steps=16):
        for x in batches(60):
            model(x)
    with pytest.warns(statscope.StatscopeWarning, match="window_steps=16; resumed with "
                                                        "window_steps=None"):
        with statscope.record(model, tmp_path / "r", step="forward", window_steps=None,
                              resume=40):
            for x in batches(8, seed=1):
                model(x)
    win = open_windows(tmp_path / "r")
    assert win.attrs["window_steps"] == 16 and win.step.values.tolist() == [0, 16, 32]
    assert verify_run(tmp_path / "r") == []


def test_a_writer_killed_while_cutting_back_leaves_the_kept_rows_committed(tmp_path,
                                                                          monkeypatch):
    # resuming at a step cuts the commit marker back first, then the arrays: a writer that dies
    # between the two leaves longer arrays than the marker says, which readers do not see and
    # the next resume cuts
    from statscope.writer_arrays import WriterArrays

    model = fc()
    kw = {"step": "forward", "writer": "thread"}
    with statscope.record(model, tmp_path / "r", **kw):
        for x in batches(30):
            model(x)

    def die(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(WriterArrays, "_truncate", die)
        with pytest.raises(KeyboardInterrupt):
            statscope.record(model, tmp_path / "r", resume=12, **kw).start()
    assert statscope.open_run(tmp_path / "r").step.values.tolist() == list(range(12))
    with statscope.record(model, tmp_path / "r", resume=True, **kw) as rec:
        assert rec.current_step == 12
        model(batches(1, seed=1)[0])
    assert statscope.open_run(tmp_path / "r").step.values.tolist() == list(range(13))
    assert verify_run(tmp_path / "r") == []


def test_resume_past_the_last_step_leaves_a_gap_and_starts_a_new_run_there(tmp_path):
    model = fc()
    with statscope.record(model, tmp_path / "r", step="forward"):
        for x in batches(5):
            model(x)
    with statscope.record(model, tmp_path / "r", step="forward", resume=9):
        for x in batches(2, seed=1):
            model(x)
    assert statscope.open_run(tmp_path / "r").step.values.tolist() == [0, 1, 2, 3, 4, 9, 10]
    with statscope.record(model, tmp_path / "new", step="forward", resume=100) as rec:
        assert rec.current_step == 100
        model(batches(1)[0])
    assert statscope.open_run(tmp_path / "new").step.values.tolist() == [100]
    with statscope.record(model, tmp_path / "r", step="forward", resume=0):
        model(batches(1)[0])
    assert statscope.open_run(tmp_path / "r").step.values.tolist() == [0]
    for bad in (-1, 2.5, "3", None):
        with pytest.raises(StatscopeError, match=f"resume={bad!r}"):
            statscope.record(model, tmp_path / "r", resume=bad)


@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
def test_both_mechanisms_record_the_same_and_clean_up(tmp_path, mechanism):
    model = fc()
    xs = batches(3)
    with statscope.record(model, tmp_path / mechanism, mechanism=mechanism):
        for x in xs:
            model(x)
    ds = statscope.open_run(tmp_path / mechanism)
    with torch.no_grad():
        want = np.stack([model[0](x).double().std(0, correction=0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_std.values[:, :6], want, rtol=1e-5)
    assert "forward" not in model[1].__dict__ and not model[1]._forward_pre_hooks
    never_started = statscope.record(model, tmp_path / "unused")
    never_started.close()
    with pytest.raises(StatscopeError, match="mechanism='magic'"):
        statscope.record(model, tmp_path / "m", mechanism="magic")


def test_lazy_modules_learn_their_channels_at_the_first_forward(tmp_path):
    model = nn.Sequential(nn.LazyLinear(6), nn.LazyBatchNorm1d())
    x = torch.randn(4, 5)
    with statscope.record(model, tmp_path / "r"):
        model(x)
        model(x)
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes == {"step": 2, "neuron": 6} and ds.attrs["probes"][0]["channels"] == 6
    with torch.no_grad():
        want = model[0](x).double().std(0, correction=0).numpy()
    np.testing.assert_allclose(ds.bn_std.values[1], want, rtol=1e-5)
    np.testing.assert_array_equal(ds.running_var0.values, np.ones(6, np.float32))


def assert_recorded(path, model, xs):
    """The run holds one step per input in ``xs``, each the mean of ``model[0]``'s output."""
    ds = statscope.open_run(path)
    assert ds.sizes["step"] == len(xs)
    with torch.no_grad():
        want = np.stack([model[0](x).double().mean(0).numpy() for x in xs])
    np.testing.assert_allclose(ds.bn_mean.sel(neuron=ds.layer == "1").values, want, atol=1e-6)


@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
def test_a_deep_copy_of_the_model_computes_with_its_own_parameters_and_is_not_recorded(
        tmp_path, mechanism):
    # an EMA or averaged model (copy.deepcopy while recording): the wrapped forwards closed over
    # the original module, so the copy's BatchNorm/LayerNorm layers computed with the original's
    # parameters, and the copy's forwards fed the original's probes and step boundary
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                          nn.LayerNorm(6))
    xs = batches(3)
    with statscope.record(model, tmp_path / "r", step="forward", mechanism=mechanism):
        model(xs[0])
        ema = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema.parameters():
                p.mul_(2.0)
        got = ema(xs[1])  # training mode, between two recorded steps
        model(xs[2])
    fresh = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                          nn.LayerNorm(6))
    fresh.load_state_dict(ema.state_dict())  # training mode: the batch's statistics
    torch.testing.assert_close(got, fresh(xs[1]), rtol=0, atol=0)
    assert_recorded(tmp_path / "r", model, (xs[0], xs[2]))


@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
def test_the_whole_model_can_be_saved_while_recording(tmp_path, mechanism):
    # torch.save(model) pickles the instance's forward: a closure failed to pickle, so saving
    # a checkpoint of the whole model crashed training; the loaded copy carries no probe
    import io

    torch.manual_seed(0)
    model = fc()
    xs = batches(2)
    with statscope.record(model, tmp_path / "r", step="forward", mechanism=mechanism):
        model(xs[0])
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        out = loaded(xs[1])
    torch.testing.assert_close(out, model(xs[1]), rtol=0, atol=0)
    assert statscope.open_run(tmp_path / "r").sizes["step"] == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # torch's own, at F.batch_norm
@pytest.mark.parametrize("capture", ["export", "jit.trace"])
@pytest.mark.parametrize("mechanism", ["forward", "hooks"])
def test_exporting_or_tracing_while_recording_captures_the_model_alone(tmp_path, mechanism,
                                                                       capture):
    # export: the program held a statscope::observe call per probe, which a program loaded
    # without statscope cannot run; jit.trace: the BatchNorm fast path failed the tracer
    # ('unsupported argument type long'), the generic probes were traced into the graph
    model = fc()
    xs = batches(3)
    with statscope.record(model, tmp_path / "r", step="forward", mechanism=mechanism):
        model(xs[0])
        if capture == "export":
            program = torch.export.export(model, (xs[1],))
            assert not [n for n in program.graph.nodes if "statscope" in str(n.target)]
            run = program.module()
        else:  # check_trace would rerun the model eagerly: a real training forward, recorded
            run = torch.jit.trace(model, xs[1], check_trace=False)
        model(xs[2])
        out = run(xs[1])
    torch.testing.assert_close(out, model(xs[1]), rtol=1e-6, atol=1e-6)
    assert_recorded(tmp_path / "r", model, (xs[0], xs[2]))
