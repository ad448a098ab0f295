"""How an error and a feedback point's output are cut into rows of the projection.

The error ``e`` is ``(*rows, *features)``: rows are the batch, and batch and sequence for ``(B, T, V)``. A
point's output shares those rows (a per-sample error gives every token the same feedback); the rest is ``d_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
    batch_shared: bool = False  # one output for the whole batch: its gradient sums the samples' feedback

    @classmethod
    def of(cls, name: str, output: torch.Size, error: torch.Size, rows: int) -> PointShape:
        if rows == 2 and len(output) == 3 and output[0] == 1 < error[0] and output[1] == error[1]:
            return cls(output, rows, output[-1], broadcast=False, batch_shared=True)  # e.g. position embeddings
        if tuple(output[:rows]) != tuple(error[:rows]) or len(output) <= rows:
            raise ValueError(
                f"Feedback point {name!r} outputs shape {tuple(output)}, which does not start with the error's "
                f"row dimensions {tuple(error[:rows])} (error shape {tuple(error)}). Choose points whose outputs "
                "share the error's batch (and sequence) dimensions, or set error_rows."
            )
        broadcast = rows == 1 and len(output) == 3
        features = output[-1] if broadcast else math.prod(output[rows:])
        return cls(output, rows, features, broadcast)

    def gradient(self, feedback: Tensor) -> Tensor:
        """Reshape ``(N, features)`` feedback into the point output's gradient."""
        if self.broadcast:
            return feedback[:, None, :].expand(self.shape)
        if self.batch_shared:
            return feedback.reshape(-1, *self.shape[1:]).sum(dim=0, keepdim=True)
        return feedback.reshape(self.shape)


def spatial_error_rows(error: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` errors as ``(B*H*W, C*patch*patch)`` rows: each pixel with its neighbourhood."""
    batch, channels, height, width = error.shape
    if patch == 1:
        return error.permute(0, 2, 3, 1).reshape(-1, channels)
    columns = F.unfold(error, patch, padding=patch // 2)  # (B, C*p*p, H*W), zero outside the image
    return columns.transpose(1, 2).reshape(batch * height * width, channels * patch * patch)


@dataclass(frozen=True)
class SpatialShape:
    """Per-pixel feedback ``(B*H*W, C_i)`` as the gradient of a ``(B, C_i, H_i, W_i)`` or ``(B, D)`` output."""

    shape: torch.Size
    error_shape: torch.Size
    features: int

    @classmethod
    def of(cls, name: str, output: torch.Size, error: torch.Size) -> SpatialShape:
        if len(error) != 4:
            raise ValueError(
                f"spatial_feedback needs an image error (B, C, H, W) at the output point, got shape {tuple(error)}. "
                "Use spatial_feedback=False for other outputs."
            )
        if len(output) not in (2, 4) or output[0] != error[0]:
            raise ValueError(
                f"Feedback point {name!r} outputs shape {tuple(output)}; spatial feedback feeds (B, C, H, W) feature "
                f"maps or (B, D) vectors with the error's batch size {error[0]} (error shape {tuple(error)})."
            )
        return cls(output, error, output[1])

    def gradient(self, feedback: Tensor) -> Tensor:
        batch, _, height, width = self.error_shape
        maps = feedback.reshape(batch, height, width, self.features)
        if len(self.shape) == 2:
            return maps.mean(dim=(1, 2))
        maps = maps.permute(0, 3, 1, 2)
        size = tuple(self.shape[2:])
        if size == (height, width):
            return maps
        if size[0] <= height and size[1] <= width:
            return F.adaptive_avg_pool2d(maps, size)
        return F.interpolate(maps, size=size, mode="nearest")
