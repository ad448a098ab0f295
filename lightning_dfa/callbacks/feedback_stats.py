"""``FeedbackStats``: the size of the error and of each point's feedback, as training sees them.

It logs ``feedback/error_rms``, ``feedback_rms/<point>`` and ``feedback_ratio/<point>`` (the feedback's rms over
the error's).

Example::

    Trainer(strategy="dfa", callbacks=[FeedbackStats(every_n_steps=50)])
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_dfa.callbacks.common import check_every_n_steps, find_dfa


class FeedbackStats(Callback):
    """Error and feedback RMS per point, logged every ``every_n_steps`` steps (see the module docstring)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.latest: dict[str, float] = {}
        self._due = False
        self._dfa: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dfa = find_dfa(trainer)
        if self._dfa is not None:
            self._dfa.observers.append(self._observe)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._dfa is not None and self._observe in self._dfa.observers:
            self._dfa.observers.remove(self._observe)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._due = trainer.global_step % self.every_n_steps == 0
        self.latest = {}

    def _observe(self, error: Tensor, feedback: dict[str, Tensor]) -> None:
        if not self._due:
            return
        error_rms = error.float().pow(2).mean().sqrt().item()
        self.latest["feedback/error_rms"] = error_rms
        for name, values in feedback.items():
            rms = values.pow(2).mean().sqrt().item()
            self.latest[f"feedback_rms/{name}"] = rms
            self.latest[f"feedback_ratio/{name}"] = rms / max(error_rms, 1e-30)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._due and self.latest:
            pl_module.log_dict(self.latest, on_step=True, on_epoch=False)
        self._due = False
