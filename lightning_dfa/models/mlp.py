"""A plain MLP classifier: the quick start's model, and the reference for DFA on MLPs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dfa.optim import param_groups

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class MLPClassifier(pl.LightningModule):
    """``depth`` blocks of Linear + activation, then a linear head; cross-entropy, accuracy.

    Each block is a feedback point; the head is the error point, so its output's gradient
    (softmax - one-hot, per sample) is the error that DFA projects.
    ``dfa``: DFA settings over ``configure_dfa()``, as in :class:`~lightning_dfa.models.CausalLM`.

    Example::

        Trainer(strategy="dfa", max_epochs=30).fit(MLPClassifier(), datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 256,
        depth: int = 3,
        num_classes: int = 10,
        activation: str = "tanh",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dfa: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        self.save_hyperparameters()
        widths = [in_features] + [hidden] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), ACTIVATIONS[activation]()) for a, b in zip(widths, widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    def configure_dfa(self) -> dict[str, Any]:
        return {"blocks": "blocks.*", "output": "head", **(self.hparams.dfa or {})}

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        # Validation and test are epoch means: over every rank's batches, not rank 0's alone.
        self.log(f"{split}/loss", loss, prog_bar=split != "test", sync_dist=split != "train")
        self.log(f"{split}/acc", acc, prog_bar=True, sync_dist=split != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = param_groups(self, hp.lr, hp.weight_decay, decay_vectors=True)
        return torch.optim.Adam(groups, lr=hp.lr)
