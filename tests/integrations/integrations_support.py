"""Tiny models and float64 references shared by the callback tests and the benchmark."""

import numpy as np
import torch
from torch import nn

STATS = ("bn_mean", "bn_std", "en_mean", "en_std")


def reference_stats(x: torch.Tensor, channel_dim: int) -> dict[str, np.ndarray]:
    """Per-channel and whole-layer moments of ``x`` in float64 (population std, no eps).

    Returns:
        {stat: (C,) array}; the EN statistics (one group) repeated per channel.
    """
    x = x.detach().double().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim]).numpy()
    c = x.shape[1]
    return {"bn_mean": x.mean(0), "bn_std": x.std(0),
            "en_mean": np.full(c, x.mean()), "en_std": np.full(c, x.std())}


def check_step_values(ds, layer, inputs, channel_dim, rtol=2e-5, atol=2e-6):
    """The recorded statistics of ``layer`` at each step equal the float64 reference of the
    input that step's first forward gave it (``inputs[k]``)."""
    part = ds.sel(neuron=ds.layer == layer)
    assert part.sizes["step"] == len(inputs)
    for k, x in enumerate(inputs):
        ref = reference_stats(x, channel_dim)
        for stat in STATS:
            np.testing.assert_allclose(part[stat].values[k], ref[stat], rtol=rtol, atol=atol,
                                       err_msg=f"{layer} {stat} step {k}")


def regression_loader(n=64, batch_size=4, seed=0):
    """Batches of (x (batch, 5), y (batch, 1)) standard normal, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                       batch_size=batch_size)


class TokenData(torch.utils.data.Dataset):
    """Random token sequences with binary labels, for a tiny BERT."""

    def __init__(self, n, seq=8, vocab=50, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, vocab, (n, seq), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]),
                "labels": self.y[i]}


def tiny_bert(seed=0):
    """A one-layer BERT classifier built from a config (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                        num_labels=2)
    return BertForSequenceClassification(config)


def hf_arguments(out, **kwargs):
    from transformers import TrainingArguments

    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6,
                    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                    disable_tqdm=True, dataloader_num_workers=0, seed=0)
    settings.update(kwargs)
    return TrainingArguments(**settings)


class NormNet(nn.Module):
    """A regression net with a BatchNorm1d (``bn``) and a LayerNorm (``ln``) that returns the
    Hugging Face Trainer's ``{"loss", "logits"}`` from ``forward(x, labels)``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.bn = nn.Linear(5, 8), nn.BatchNorm1d(8)
        self.fc2, self.ln, self.out = nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 1)

    def forward(self, x, labels=None):
        h = self.out(self.ln(self.fc2(torch.relu(self.bn(self.fc1(x))))))
        loss = None if labels is None else (h.float() - labels).square().mean()
        return {"loss": loss, "logits": h}


class RegressionData(torch.utils.data.Dataset):
    """``n`` items ``{"x": (5,), "labels": (1,)}``, standard normal, fixed by ``seed``."""

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}
