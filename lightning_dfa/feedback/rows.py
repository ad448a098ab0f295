"""How an error and a feedback point's output are cut into rows of the projection.

The error ``e`` has shape ``(*rows, *features)``: by default its batch dimension is the row
(``(B, C)`` logits, ``(B, C, H, W)`` images), and for 3-d errors ``(B, T, V)`` batch and
sequence are (per-token errors give per-token feedback). A point's output must share those
leading dimensions; the rest of it is flattened into the point's feedback size ``d_i``.

One special case, per-sample errors with per-token outputs (a ViT's logits ``(B, C)`` against
its blocks' ``(B, T, D)``): with ``sequence_feedback="broadcast"`` (default) the point gets
``d_i = D`` and the same feedback for every token; with ``"flatten"`` it gets ``d_i = T * D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SEQUENCE_FEEDBACK = ("broadcast", "flatten")


def error_row_dims(error_shape: torch.Size, error_rows: int | None) -> int:
    """How many leading dimensions of the error are rows."""
    if len(error_shape) < 2:
        raise ValueError(
            f"The error has shape {tuple(error_shape)}: the output point must return a batch of vectors, "
            "shape (batch, ..., features). Choose the module that produces logits or hidden states."
        )
    if error_rows is None:
        error_rows = 2 if len(error_shape) == 3 else 1
    if not 1 <= error_rows < len(error_shape):
        raise ValueError(
            f"The error has shape {tuple(error_shape)}: error_rows must leave at least one feature dimension "
            f"(1 to {len(error_shape) - 1}), got {error_rows}."
        )
    return error_rows


@dataclass(frozen=True)
class PointShape:
    """How feedback of size ``features`` per row becomes the gradient of a point's output."""

    shape: torch.Size
    rows: int
    features: int
    broadcast: bool

    @classmethod
    def of(cls, name: str, output: torch.Size, error: torch.Size, rows: int, sequence_feedback: str) -> PointShape:
        if tuple(output[:rows]) != tuple(error[:rows]) or len(output) <= rows:
            raise ValueError(
                f"Feedback point {name!r} outputs shape {tuple(output)}, which does not start with the error's "
                f"row dimensions {tuple(error[:rows])} (error shape {tuple(error)}). Choose points whose outputs "
                "share the error's batch (and sequence) dimensions, or set error_rows."
            )
        broadcast = rows == 1 and len(output) == 3 and sequence_feedback == "broadcast"
        features = output[-1] if broadcast else math.prod(output[rows:])
        return cls(output, rows, features, broadcast)

    def gradient(self, feedback: Tensor) -> Tensor:
        """Reshape ``(N, features)`` feedback into the point output's gradient."""
        if self.broadcast:
            return feedback[:, None, :].expand(self.shape)
        return feedback.reshape(self.shape)
