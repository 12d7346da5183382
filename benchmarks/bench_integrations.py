"""Overhead of the statscope callbacks inside a real Lightning and Hugging Face Trainer.

    python benchmarks/bench_integrations.py [--steps 300] [--repeats 5] [--threads 1]

For each trainer the same fit runs with and without the statscope callback: Lightning on the
paper's 4-layer FC net (128 neurons, BatchNorm1d + ReLU) at batch size 4 and 128, with
``accumulate_grad_batches`` 1 and 2; the Hugging Face Trainer on a small BERT built from a config
(2 layers, hidden 128, 32 tokens, 5 LayerNorms) at batch size 8. A timing callback, present in
both arms, times ``--steps`` optimizer steps after a warm-up, so trainer set-up is not counted.
The arms alternate ABBA, repeat after repeat; each ratio is the median over pairs of callback /
plain, so drift of the machine affects both alike. Another option, ``--live N``, adds a
TensorBoard export every N steps to the callback arm.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

WARMUP = 30


class StepClock:
    """Seconds per optimizer step after ``WARMUP`` steps, as a mixin for either trainer's
    callback (started at the warm-up's end, stopped when training ends)."""

    def __init__(self):
        self.t0 = None
        self.steps_at_t0 = 0
        self.seconds_per_step = None

    def tick(self, global_step: int) -> None:
        if self.t0 is None and global_step >= WARMUP:
            self.t0, self.steps_at_t0 = time.perf_counter(), global_step

    def stop(self, global_step: int) -> None:
        self.seconds_per_step = (time.perf_counter() - self.t0) / (global_step - self.steps_at_t0)


def fc_net(L):
    class FCNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            layers, width = [], 784
            for _ in range(4):
                layers += [nn.Linear(width, 128), nn.BatchNorm1d(128), nn.ReLU()]
                width = 128
            self.net = nn.Sequential(*layers, nn.Linear(128, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    return FCNet()


def lightning_fit(bs: int, accumulate: int, steps: int, statscope_on: bool, tmp: str,
                  live: int | None) -> float:
    import lightning.pytorch as L

    from statscope.integrations import LiveExport, StatscopeCallback

    class Clock(L.Callback, StepClock):
        def __init__(self):
            StepClock.__init__(self)

        def on_train_batch_start(self, trainer, *args):
            self.tick(trainer.global_step)

        def on_train_end(self, trainer, *args):
            self.stop(trainer.global_step)

    torch.manual_seed(0)
    n = (WARMUP + steps) * accumulate * bs
    data = torch.utils.data.TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
    clock = Clock()
    callbacks = [clock]
    if statscope_on:
        callbacks.append(StatscopeCallback(
            f"{tmp}/lit", overwrite=True,
            live=LiveExport(f"{tmp}/lit-tb", every=live) if live else None))
    trainer = L.Trainer(max_steps=WARMUP + steps, accumulate_grad_batches=accumulate,
                        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(fc_net(L), torch.utils.data.DataLoader(data, batch_size=bs))
    return clock.seconds_per_step


def hf_fit(bs: int, steps: int, statscope_on: bool, tmp: str, live: int | None) -> float:
    from transformers import (BertConfig, BertForSequenceClassification, PrinterCallback,
                              Trainer, TrainerCallback, TrainingArguments)

    from statscope.integrations import LiveExport, StatscopeTrainerCallback

    class Clock(TrainerCallback, StepClock):
        def __init__(self):
            StepClock.__init__(self)

        def on_step_begin(self, args, state, control, **kwargs):
            self.tick(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            self.stop(state.global_step)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randint(0, 1000, (n, 32), generator=g)
            self.y = torch.randint(0, 2, (n,), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]),
                    "labels": self.y[i]}

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=64)
    model = BertForSequenceClassification(config)
    args = TrainingArguments(output_dir=f"{tmp}/hf-out", per_device_train_batch_size=bs,
                             max_steps=WARMUP + steps, logging_steps=50, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    clock = Clock()
    callbacks = [clock]
    if statscope_on:
        callbacks.append(StatscopeTrainerCallback(
            f"{tmp}/hf", overwrite=True,
            live=LiveExport(f"{tmp}/hf-tb", every=live) if live else None))
    trainer = Trainer(model=model, args=args, train_dataset=Tokens((WARMUP + steps) * bs),
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the log dicts it prints every logging_steps
    trainer.train()
    return clock.seconds_per_step


def paired(fit, repeats: int) -> tuple[float, float, float]:
    """Median seconds per step without and with the callback, and the median paired ratio;
    the arms run ABBA (plain, statscope, statscope, plain) so drift hits both alike."""
    plain, probed = [], []
    for r in range(repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        for on in order:
            (probed if on else plain).append(fit(on))
    ratio = statistics.median(b / a for a, b in zip(plain, probed))
    return statistics.median(plain), statistics.median(probed), ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--live", type=int, default=None,
                    help="also export to TensorBoard every N steps in the callback arm")
    ap.add_argument("--only", choices=("lightning", "hf"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # the trainers' banners and tips, per fit
    warnings.filterwarnings("ignore")  # third-party deprecation notices, per fit
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s), {args.steps} timed steps "
          f"after {WARMUP}, {args.repeats} repeats (ABBA), live export "
          f"{'every ' + str(args.live) + ' steps' if args.live else 'off'}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if args.only in (None, "lightning"):
            cases += [(f"Lightning FC net bs {bs:>3}, accumulate {acc}",
                       lambda on, bs=bs, acc=acc: lightning_fit(bs, acc, args.steps, on, tmp,
                                                                args.live))
                      for bs in (4, 128) for acc in (1, 2)]
        if args.only in (None, "hf"):
            cases.append(("HF Trainer BERT-2x128 bs 8, 32 tokens",
                          lambda on: hf_fit(8, args.steps, on, tmp, args.live)))
        for name, fit in cases:
            plain, probed, ratio = paired(fit, args.repeats)
            print(f"{name}: plain {plain * 1e3:.3f} ms/step, with statscope "
                  f"{probed * 1e3:.3f} ms/step, ratio {ratio:.3f}x", flush=True)


if __name__ == "__main__":
    main()
