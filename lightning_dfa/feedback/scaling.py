"""How the error is encoded before the projection, and how each point's feedback is scaled after it.

Error encodings (``error_encoding=``), applied to the ``(rows, d_e)`` error:

- ``"none"``: the error as it is (softmax minus one-hot for a cross-entropy head);
- ``"row"``: every row scaled to unit RMS, so well-predicted tokens or samples weigh as much as bad ones;
- ``"sign"``: ``sign(e)``, one bit per value: what a binary optical encoder can display;
- ``"ternary"``: ``sign(e)`` where ``|e|`` exceeds ``ternary_threshold`` times the row's RMS, else 0.

Feedback scales (``feedback_scale=``), a factor per point on top of the projector's own
``1/sqrt(d_e)`` (``"fan_in"``, the default):

- ``"layer"``: ``sqrt(d_max / d_i)``, so narrow points get as much feedback norm as wide ones;
- ``"xavier"``: standard deviation ``sqrt(2 / (d_e + d_i))`` instead of ``1/sqrt(d_e)``;
- ``"adaptive"``: each point's feedback RMS follows the error's RMS, through a running factor
  (``scale_momentum``), so every block gets a gradient as large as the one at the output.

With Adam-type optimizers a constant factor per parameter tensor cancels out (up to ``eps``):
the fixed scales matter for SGD, the encodings and the adaptive scale's changes over time for both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ERROR_ENCODINGS = ("none", "row", "sign", "ternary")
FEEDBACK_SCALES = ("fan_in", "layer", "xavier", "adaptive")


def encode_error(rows: Tensor, encoding: str, ternary_threshold: float = 1.0) -> Tensor:
    """The ``(N, d_e)`` error rows in the chosen encoding (see the module docstring)."""
    if encoding == "none":
        return rows
    rms = rows.pow(2).mean(dim=1, keepdim=True).sqrt()
    if encoding == "row":
        return rows / rms.clamp_min(torch.finfo(rows.dtype).tiny)
    if encoding == "sign":
        return torch.sign(rows)
    return torch.sign(rows) * (rows.abs() > ternary_threshold * rms)


def fixed_scales(kind: str, error_features: int, point_features: dict[str, int]) -> dict[str, float]:
    """The constant factor of each point for the ``"fan_in"``, ``"layer"`` and ``"xavier"`` conventions."""
    if kind == "layer":
        widest = max(point_features.values())
        return {name: math.sqrt(widest / d) for name, d in point_features.items()}
    if kind == "xavier":
        return {name: math.sqrt(2 * error_features / (error_features + d)) for name, d in point_features.items()}
    return {name: 1.0 for name in point_features}


class AdaptiveScale:
    """Running factors that bring each point's feedback RMS to the error's RMS."""

    def __init__(self, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"scale_momentum must be in [0, 1), got {momentum!r}.")
        self.momentum = momentum
        #: Point name -> 0-d tensor on the feedback's device (no host sync per step).
        self.factors: dict[str, Tensor] = {}

    def update(self, name: str, error: Tensor, feedback: Tensor) -> Tensor:
        """Fold this step's ``rms(error) / rms(feedback)`` into the point's factor and return the factor."""
        ratio = rms(error) / rms(feedback).clamp_min(torch.finfo(torch.float32).tiny)
        previous = self.factors.get(name)
        if previous is None:  # first step: no history to smooth with
            self.factors[name] = ratio
        else:
            self.factors[name] = self.momentum * previous.to(ratio.device) + (1.0 - self.momentum) * ratio
        return self.factors[name]


def rms(values: Tensor) -> Tensor:
    return values.float().pow(2).mean().sqrt()
