"""Each feedback point's weight gradient on a real model and batch: what the optimizer sees under a projector.

A block's DFA gradient is its columns of ``projector(e)`` pushed through the block's own backward and summed over
the step's vectors. Comparing it between two projectors on the same model, batch and random draws (dropout, a
diffusion model's noise) measures what a projector's error costs a step (with
:func:`lightning_dfa.projectors.fidelity.gradient_fidelity`), on the errors and block inputs of real training.

Example::

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> engine = FeedbackEngine(blocks=["0", "2"], output="4")
    >>> loss = lambda m, batch: m(batch).square().mean()
    >>> grads = point_gradients(engine, model, loss, torch.randn(5, 4))
    >>> sorted(grads), grads["0"].shape                 # weight and bias of each point, flattened
    (['0', '2'], torch.Size([40]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dfa.feedback.engine import FeedbackEngine
from lightning_dfa.feedback.points import inside, point_parameters


def point_gradients(
    engine: FeedbackEngine,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    seed: int = 0,
) -> dict[str, Tensor]:
    """One backward of ``loss_fn(model, batch)`` under ``engine``; each point's parameter gradients, flattened
    (float64, in parameter order). The forward's random draws are fixed by ``seed`` (the caller's random state is
    left as it was), so that two engines see the same forward. The engine is attached for this backward only and
    keeps its projector between calls (a stateful projector draws new noise per call, as in training)."""
    engine.attach(model)
    try:
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loss_fn(model, batch).backward()
        grads: dict[str, list[Tensor]] = {point: [] for point in engine.points}
        for param, owner in point_parameters(model, engine.points)[0].items():
            point = next(p for p in engine.points if inside(owner, p))
            grad = torch.zeros_like(param) if param.grad is None else param.grad
            grads[point].append(grad.detach().flatten().double())
        return {point: torch.cat(parts) for point, parts in grads.items() if parts}
    finally:
        engine.detach()
        model.zero_grad(set_to_none=True)
