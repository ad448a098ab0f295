"""What the recipes' models share: DFA settings (``dfa=`` over ``configure_dfa()``), AdamW, classification steps,
local checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_dfa.optim import param_groups


def local_checkpoint(path: str) -> str:
    """``path`` if it is a local folder with a ``config.json``; a clear error otherwise (no hub look-up)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained={path!r} is not a local folder with a config.json. Give a folder written by "
            "model.save_pretrained(...) (hub names are not fetched), or config={...} for a new model."
        )
    return str(folder)


def check_config_or_pretrained(config: Any, pretrained: Any, new: str) -> None:
    """A model is new (``config``) or loaded (``pretrained``), not both."""
    if config is not None and pretrained is not None:
        raise ValueError(f"Give either config (a new {new}) or pretrained (a local checkpoint), not both.")


def built(model: torch.nn.Module | None, owner: str, how: str) -> torch.nn.Module:
    """``model`` once built by ``configure_model``; a clear error saying how to build it otherwise."""
    if model is None:
        raise RuntimeError(f"{owner} is not built yet: {how}")
    return model


class DFAModule(pl.LightningModule):
    """A LightningModule whose ``configure_dfa()`` is its :meth:`dfa_defaults` with its ``dfa=`` hyperparameter
    (e.g. ``{"backprop_top": 1}``) over them; strategy arguments still win. Optimizer: ``optimizer`` (AdamW) over
    :func:`~lightning_dfa.optim.param_groups`, from the ``lr``, ``weight_decay`` and ``betas`` hyperparameters."""

    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW

    def dfa_defaults(self) -> dict[str, Any]:
        """This model's feedback points and error point."""
        return {}

    def configure_dfa(self) -> dict[str, Any]:
        return {**self.dfa_defaults(), **(self.hparams.get("dfa") or {})}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = param_groups(self, hp.lr, hp.weight_decay, decay_vectors=True)
        return self.optimizer(groups, lr=hp.lr, betas=tuple(hp.get("betas", (0.9, 0.999))))


class Classification(pl.LightningModule):
    """Cross-entropy on ``self(x)`` for ``(x, y)`` batches; logs ``<split>/loss`` and ``<split>/acc``."""

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = multiclass_accuracy(logits.detach(), y, logits.shape[-1], average="micro")
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
