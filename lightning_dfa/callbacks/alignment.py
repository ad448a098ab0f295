"""``Alignment``: how well each block's DFA update points along its true backprop gradient.

Every ``every_n_steps`` training steps, just before the optimizer step, it computes the true
gradient on the same batch with one extra backward (DFA paused, same random state so dropout and
diffusion noise are identical; no model copy), then puts the step's own gradients back untouched.
Per feedback point it logs

- ``alignment/<point>``: cosine between the DFA update and the true gradient of the point's
  parameters (1 under ``mode="backprop"``; above 0 means DFA descends the loss);
- ``grad_ratio/<point>``: norm of the DFA update over norm of the true gradient;

and ``alignment/mean``. W&B draws them as line plots; ``history`` keeps them for the run's plots.

Example::

    Trainer(strategy="dfa", callbacks=[Alignment(every_n_steps=50)])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_dfa.callback import find_dfa


class Alignment(Callback):
    """Cosine between DFA updates and true gradients per feedback point (see the module docstring)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, float]] = []
        self._batch: tuple[Any, int, dict[str, Any]] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("Alignment needs automatic optimisation: it re-runs training_step for the true gradient.")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        due = trainer.global_step % self.every_n_steps == 0
        self._batch = (batch, idx, _rng_state()) if due and _probed(trainer) else None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._batch is None:
            return
        dfa = find_dfa(trainer)
        batch, idx, rng = self._batch
        self._batch = None
        params = {name: _trainable(pl_module, name) for name in dfa.points}
        update = {name: _flat_grad(ps) for name, ps in params.items()}
        if trainer.accumulate_grad_batches > 1:  # the step's gradient is a sum: redo this batch's DFA update
            update = _gradients(trainer, pl_module, batch, idx, rng, params, dfa, pause=False)
        true = _gradients(trainer, pl_module, batch, idx, rng, params, dfa, pause=True)
        row = {"step": float(trainer.global_step)}
        for name in dfa.points:
            if update[name] is None or true[name] is None:
                continue
            cosine = torch.nn.functional.cosine_similarity(update[name], true[name], dim=0).item()
            row[f"alignment/{name}"] = cosine
            row[f"grad_ratio/{name}"] = (update[name].norm() / true[name].norm().clamp_min(1e-30)).item()
        cosines = [v for k, v in row.items() if k.startswith("alignment/")]
        if cosines:
            row["alignment/mean"] = sum(cosines) / len(cosines)
        self.history.append(row)
        pl_module.log_dict({k: v for k, v in row.items() if k != "step"}, on_step=True, on_epoch=False)


def _probed(trainer: pl.Trainer) -> bool:
    dfa = find_dfa(trainer)
    return dfa is not None and dfa.mode != "frozen"


def _trainable(module: pl.LightningModule, name: str) -> list[torch.nn.Parameter]:
    return [p for p in module.get_submodule(name).parameters() if p.requires_grad]


def _flat_grad(params: list[torch.nn.Parameter]) -> Tensor | None:
    grads = [p.grad.detach().flatten().float() for p in params if p.grad is not None]
    return torch.cat(grads) if grads else None


def _gradients(trainer, pl_module, batch, idx, rng, params, dfa, pause: bool) -> dict[str, Tensor | None]:
    """Gradients of each point's parameters on ``batch``, leaving every ``.grad`` as it was."""
    saved = {p: p.grad for p in pl_module.parameters()}
    for p in saved:
        p.grad = None
    after = _rng_state()
    try:
        _set_rng_state(rng)
        no_sync = getattr(trainer.strategy.model, "no_sync", nullcontext)
        with dfa.paused() if pause else nullcontext(), no_sync(), _quiet(pl_module):
            output = pl_module.training_step(batch, idx)
            loss = output["loss"] if isinstance(output, dict) else output
            loss.backward()
        return {name: _flat_grad(ps) for name, ps in params.items()}
    finally:
        _set_rng_state(after)
        for p, grad in saved.items():
            p.grad = grad


@contextmanager
def _quiet(module: pl.LightningModule) -> Iterator[None]:
    """Keep what the probe's training_step logs out of the run's logs."""
    module.log, module.log_dict = (lambda *args, **kwargs: None), (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        del module.log, module.log_dict


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
