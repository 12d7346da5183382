"""Probes on nested tensors (``torch.nested``): variable-length sequences without padding. The
capture once raised inside the user's forward (the shape of a jagged tensor holds a nested
int; a strided nested tensor has no sizes)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import statscope
from statscope.errors import StatscopeError
from statscope.probes.nested import flat_nested


def nested(lengths, layout, gen, width=8, offset=0.0):
    with warnings.catch_warnings():  # torch: the strided layout is a prototype
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor(
            [torch.randn(n, width, generator=gen) + offset * i for i, n in enumerate(lengths)],
            layout=layout)


def components(t):
    return np.concatenate([c.detach().double().numpy().reshape(-1, c.shape[-1])
                           for c in t.unbind()])


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_a_nested_sequence_batch_records_its_real_elements(tmp_path, layout):
    # LayerNorm inputs (the default probes) and a Linear's output, lengths changing every step
    # (more shapes per block than a block buffers raw)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 6))
    seen = {"1:in": [], "2:out": []}
    model[1].register_forward_pre_hook(lambda m, a: seen["1:in"].append(components(a[0])) and None)
    model[2].register_forward_hook(lambda m, a, out: seen["2:out"].append(components(out)) and None)
    gen = torch.Generator().manual_seed(1)
    with statscope.record(model, tmp_path / "r", step="forward", block_steps=4,
                          layers=["1", "2"], where=("input", "output")):
        for i in range(9):
            y = model(nested([2 + i, 5, 1 + 2 * i], layout, gen, offset=3.0))
            (y.values() if layout == torch.jagged else y.to_padded_tensor(0.0)).sum().backward()
    ds = statscope.open_run(tmp_path / "r")
    assert ds.sizes["step"] == 9
    for name, rows in seen.items():
        sel = ds.layer == name
        np.testing.assert_array_equal(ds["count"].sel(neuron=sel).values[:, 0],
                                      [len(r) for r in rows])
        np.testing.assert_allclose(ds.bn_mean.sel(neuron=sel).values,
                                   np.stack([r.mean(0) for r in rows]), atol=1e-6)
        np.testing.assert_allclose(ds.bn_std.sel(neuron=sel).values,
                                   np.stack([r.std(0) for r in rows]), rtol=1e-5)
        np.testing.assert_allclose(ds.en_std.sel(neuron=sel).values[:, 0],
                                   [r.std() for r in rows], rtol=1e-5)


def test_flat_nested_keeps_the_channels_where_they_were():
    gen = torch.Generator().manual_seed(0)
    x = nested([3, 5], torch.jagged, gen, width=4)
    flat = flat_nested(x.transpose(1, 2), 1, "ln")  # (B, C, j): channels at dim 1
    assert flat.shape == (8, 4, 1)
    np.testing.assert_array_equal(flat[:, :, 0].numpy(), components(x))
    with pytest.raises(StatscopeError, match=r"channel_dim=1 is not a dim of fixed size.*'ln'"):
        flat_nested(x, 1, "ln")  # the ragged dim
