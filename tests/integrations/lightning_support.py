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
