"""``Alignment``: how well each block's DFA update points along its true backprop gradient.

Every ``every_n_steps`` steps, before the optimizer step, one extra backward on the same batch (DFA paused)
gives the true gradients; it logs ``alignment/<point>`` (cosine), ``grad_ratio/<point>`` (norm ratio) and
``alignment/mean`` (under DDP and FSDP too).

Example::

    Trainer(strategy="dfa", callbacks=[Alignment(every_n_steps=50)])
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_dfa import _lightning_compat
from lightning_dfa.callbacks.common import check_every_n_steps, find_dfa
from lightning_dfa.random_state import isolated, random_states


class Alignment(Callback):
    """Cosine between DFA updates and true gradients per feedback point (see the module docstring)."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps)
        self.history: list[dict[str, float]] = []
        self._batch: tuple[Any, int, dict[str, Any]] | None = None
        self._warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("Alignment needs automatic optimisation: it re-runs training_step for the true gradient.")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        due = trainer.global_step % self.every_n_steps == 0
        self._batch = (batch, idx, random_states()) if due and _probed(trainer) and self._supported(pl_module) else None

    def _supported(self, pl_module: pl.LightningModule) -> bool:
        if not any(_is_dtensor(p) for p in pl_module.parameters()):
            return True
        if not self._warned:
            self._warned = True
            rank_zero_warn(
                "Alignment: the model's parameters are DTensors (torch's fully_shard / tensor parallelism), whose "
                "gradients this probe cannot compare shard by shard, so it logs nothing. Measure alignment on one "
                "device, with DDP (strategy='dfa_ddp') or with FSDP (strategy='dfa_fsdp').",
                category=RuntimeWarning,
            )
        return False

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
        for name, (dot, update_sq, true_sq) in _products(trainer, dfa.points, update, true).items():
            row[f"alignment/{name}"] = dot / max((update_sq * true_sq) ** 0.5, 1e-8)
            row[f"grad_ratio/{name}"] = (update_sq / max(true_sq, 1e-60)) ** 0.5
        cosines = [v for k, v in row.items() if k.startswith("alignment/")]
        if cosines:
            row["alignment/mean"] = sum(cosines) / len(cosines)
        self.history.append(row)
        pl_module.log_dict({k: v for k, v in row.items() if k != "step"}, on_step=True, on_epoch=False)


def _products(
    trainer: pl.Trainer, points: list[str], update: dict[str, Tensor | None], true: dict[str, Tensor | None]
) -> dict[str, tuple[float, float, float]]:
    """``(update . true, |update|^2, |true|^2)`` per point with both gradients; under FSDP summed over the ranks."""
    if not _sharded(trainer):
        return {
            name: _dot_and_norms(update[name], true[name])
            for name in points
            if update[name] is not None and true[name] is not None
        }
    # Each rank holds a shard of every gradient (maybe an empty one): sum the local products over the ranks.
    local = torch.tensor([_dot_and_norms(update[name], true[name]) for name in points], dtype=torch.float64)
    total = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    return {name: tuple(row.tolist()) for name, row in zip(points, total) if row[1] > 0 and row[2] > 0}


def _dot_and_norms(update: Tensor | None, true: Tensor | None) -> tuple[float, float, float]:
    if update is None or true is None:
        return 0.0, 0.0, 0.0
    update, true = update.double(), true.double()
    return float(update @ true), float(update @ update), float(true @ true)


def _sharded(trainer: pl.Trainer) -> bool:
    """Whether the model is wrapped in torch's FSDP (1): its parameters and gradients are then per-rank shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(trainer.strategy.model, FullyShardedDataParallel)


def _is_dtensor(tensor: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


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
    sharded = _sharded(trainer)
    # Under FSDP the step's gradients are views into FSDP's flat gradient, whose storage the probe's backward
    # may reuse (with CPU offload FSDP copies each gradient into one persistent buffer): keep copies of the shards.
    saved = {p: p.grad.clone() if sharded and p.grad is not None else p.grad for p in pl_module.parameters()}
    for p in saved:
        p.grad = None
    try:
        # FSDP: through the wrapper, which gathers each unit's parameters for forward and backward and
        # reduce-scatters the gradients (the module called directly would see only this rank's shards).
        # DDP: this rank's batch alone, outside DDP's all-reduce; the point gradients are averaged below.
        no_sync = nullcontext if sharded else getattr(trainer.strategy.model, "no_sync", nullcontext)
        step = trainer.strategy.training_step if sharded else pl_module.training_step
        paused = dfa.paused() if pause else nullcontext()
        # From the batch's random state (the same dropout and noise); the step's own state goes on afterwards.
        with isolated(rng), paused, no_sync(), _lightning_compat.logging_muted(pl_module):
            output = step(batch, idx)
            loss = output["loss"] if isinstance(output, dict) else output
            loss.backward()
        grads = {name: _flat_grad(ps) for name, ps in params.items()}
        if not sharded and trainer.world_size > 1:  # the global batch's gradient, as the DFA update is
            grads = {n: None if g is None else trainer.strategy.reduce(g, reduce_op="mean") for n, g in grads.items()}
        return grads
    finally:
        for p, grad in saved.items():
            p.grad = grad
