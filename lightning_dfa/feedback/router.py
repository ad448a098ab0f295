"""The one autograd Function that turns the output error into every block's feedback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_dfa import _compat

if TYPE_CHECKING:
    from lightning_dfa.feedback.engine import FeedbackEngine


class FeedbackRouter(torch.autograd.Function):
    """Identity on the error point's output; in backward, ``e`` flows on unchanged to the head
    while ``P(e)`` is computed once and its slices become the gradients of the block outputs."""

    @staticmethod
    def forward(ctx, engine: FeedbackEngine, routed: list, error_point: Tensor, *point_outputs: Tensor) -> Tensor:
        ctx.engine, ctx.routed = engine, routed
        # The identity without a copy: a new tensor on the same memory. Not a view (FSDP2 warns on views returned
        # by custom Functions) and not a clone (a copy of the logits, B x T x vocabulary, every step).
        return error_point.detach()

    @staticmethod
    def backward(ctx, error: Tensor) -> tuple:
        ctx.engine._router_ran()
        grads = ctx.engine._feedback(error, ctx.routed, ctx.needs_input_grad[3:])
        return (None, None, error, *grads)


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. when non-reentrant checkpointing recomputes)."""
    return _compat.current_graph_task_id() != -1
