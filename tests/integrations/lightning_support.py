"""A tiny LightningModule for the callback tests and the benchmark (module level, so that
ddp_spawn can pickle it)."""

import lightning.pytorch as L
import torch
from torch import nn


class TinyNet(L.LightningModule):
    """Linear -> BatchNorm1d -> ReLU -> Linear regression; SGD with a per-step StepLR (halving
    the lr every step), or LBFGS; raises at ``fail_at_batch``."""

    def __init__(self, width: int = 8, lr: float = 0.1, batch_size: int = 4,
                 fail_at_batch: int = -1, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(5, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 1)
        self.losses: list[float] = []

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))

    def training_step(self, batch, batch_idx):
        if batch_idx == self.hparams.fail_at_batch:
            raise RuntimeError(f"boom at batch {batch_idx}")
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        if self.hparams.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.hparams.lr, max_iter=3)
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def lightning_trainer(callbacks, **kwargs):
    """A quiet CPU Trainer (no logger, checkpoints, progress bar or summary)."""
    settings = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=callbacks)
    settings.update(kwargs)
    return L.Trainer(**settings)


class GanNet(L.LightningModule):
    """Manual optimization with two optimizers: a discriminator ``d`` (SGD, lr 0.1) that steps
    every batch but those in ``skip_d``, and a generator ``g`` (SGD, lr 0.01) that steps every
    ``g_every``-th batch; each has a BatchNorm1d (``d.1``, ``g.1``). Records each batch's
    discriminator loss (what training_step returns) and raises at ``fail_at_batch``."""

    def __init__(self, g_every: int = 2, skip_d: tuple = (), fail_at_batch: int = -1,
                 interrupt_at_batch: int = -1):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
        self.d = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_d, opt_g = self.optimizers()
        fake = self.g(torch.randn_like(x))
        loss_d = self.d(x).square().mean() + self.d(fake.detach()).square().mean()
        if batch_idx == self.hparams.fail_at_batch:
            raise RuntimeError(f"boom at batch {batch_idx}")
        if batch_idx == self.hparams.interrupt_at_batch:
            raise KeyboardInterrupt
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        if batch_idx not in self.hparams.skip_d:
            opt_d.step()
        if batch_idx % self.hparams.g_every == 0:
            loss_g = (self.d(fake) - 1).square().mean()
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
        self.losses.append(float(loss_d.detach()))
        return loss_d

    def configure_optimizers(self):
        return [torch.optim.SGD(self.d.parameters(), lr=0.1),
                torch.optim.SGD(self.g.parameters(), lr=0.01)]


class ShardNet(L.LightningModule):
    """Manual optimization, BatchNorm1d first (``bn``: its input is the batch itself, so a
    reference needs only the data each rank was given), an optimizer step every second
    batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.fc(self.bn(x)), y)
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            opt = self.optimizers()
            opt.step()
            opt.zero_grad()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BatchInputs(L.Callback):
    """The inputs of chosen submodules' training forwards (training mode, autograd on), in
    float64, per batch the trainer ran in this fit (counted from 0 across epochs): the data of
    float64 references, taken by a hook independent of statscope's probes."""

    def __init__(self, *names: str):
        self.names = names
        self.inputs: dict[str, dict[int, list[torch.Tensor]]] = {n: {} for n in names}
        self.batch = -1
        self._handles: list = []

    def on_fit_start(self, trainer, pl_module):
        for name in self.names:
            hook = self._hook(name)
            self._handles.append(pl_module.get_submodule(name).register_forward_pre_hook(hook))

    def _hook(self, name):
        def hook(module, args):
            if module.training and torch.is_grad_enabled():
                x = args[0].detach().double().clone()
                self.inputs[name].setdefault(self.batch, []).append(x)
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch += 1

    def on_fit_end(self, trainer, pl_module):
        self._remove()

    def on_exception(self, trainer, pl_module, exception):
        self._remove()

    def _remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def firsts(self, name: str, groups) -> list[torch.Tensor]:
        """The first input of ``name`` in each group of batches (a list of batch numbers)."""
        return [next(x for b in group for x in self.inputs[name].get(b, []))
                for group in groups]


def step_groups(stepped) -> list[list[int]]:
    """Batches grouped into optimizer steps: ``stepped[b]`` says whether batch b ended with an
    optimizer step; batches before it that did not belong to its step. A trailing group that
    never stepped is left out."""
    groups, current = [], []
    for b, did in enumerate(stepped):
        current.append(b)
        if did:
            groups.append(current)
            current = []
    return groups
