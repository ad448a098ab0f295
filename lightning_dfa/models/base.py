"""What the recipes' models share: DFA settings (``dfa=`` over ``configure_dfa()``), AdamW, classification steps,
local checkpoints, sizes read from the datamodule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_dfa import _lightning_compat
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


class DataSized:
    """A model built in ``configure_model`` with the sizes it was not given read from the trainer's datamodule
    (``data_sizes``: config key -> datamodule reading); a built model's sizes are checked against the data.
    Subclasses define ``_given_sizes()``, ``_build(sizes)`` and ``_sizes()`` (the built network's, ``None`` before)."""

    data_sizes: dict[str, str]

    def configure_model(self) -> None:
        # Sees the trainer's datamodule, on every rank, before the optimizer and before DFA attaches (on_fit_start).
        sizes = self._sizes()
        if sizes is None:
            self._build(sizes_from_data(self, self._given_sizes(), self.data_sizes))
        else:
            check_data_sizes(self, sizes, self.data_sizes)


def data_sizes(module: pl.LightningModule) -> dict[str, int] | None:
    """The datamodule's ``{"classes", "channels", "image_size"}``, or ``None`` without one that tells them."""
    trainer = _lightning_compat.attached_trainer(module)
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "image_shape"):
        return None
    channels, height, width = datamodule.image_shape
    if height != width:
        raise ValueError(f"The data's images are {height}x{width}; {type(module).__name__} needs square images.")
    return {"classes": getattr(datamodule, "num_classes", None), "channels": channels, "image_size": height}


def sizes_from_data(module: pl.LightningModule, sizes: dict[str, Any], readings: dict[str, str]) -> dict[str, Any]:
    """``sizes`` with its ``None`` entries read from the trainer's datamodule (``readings``: key -> reading)."""
    data, filled = data_sizes(module), dict(sizes)
    for key in (k for k, v in sizes.items() if v is None):
        if data is None or data[readings[key]] is None:
            raise ValueError(
                f"{type(module).__name__} needs {key}: give it (argument or config), or train with a datamodule "
                "that has num_classes and image_shape (lightning_dfa.data.ImageDataModule)."
            )
        filled[key] = data[readings[key]]
    check_data_sizes(module, filled, readings)
    return filled


def check_data_sizes(module: pl.LightningModule, sizes: dict[str, Any], readings: dict[str, str]) -> None:
    """Raise if the model's sizes disagree with the trainer's datamodule (naming both)."""
    data = data_sizes(module)
    if data is None:
        return
    for key, reading in readings.items():
        if data[reading] is not None and sizes[key] != data[reading]:
            raise ValueError(
                f"{type(module).__name__} has {key}={sizes[key]} but the data has {reading}={data[reading]}: "
                f"set {key}={data[reading]} (or leave it out to take it from the data), or change the data."
            )
