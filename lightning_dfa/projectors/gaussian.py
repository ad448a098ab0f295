"""Dense Gaussian feedback: the reference projector, materialised, for small sizes and audits."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.checks import check_fits_in_memory


def default_std(in_features: int) -> float:
    """The library-wide scale convention, entries ``N(0, 1/in_features)``: a feedback entry then has variance
    ``|e|^2 / d_e``, the size of the error whatever ``d_e`` is."""
    return 1.0 / math.sqrt(in_features)


class Gaussian(Projector):
    """``B`` with i.i.d. entries ``N(0, std^2)`` (``std = 1/sqrt(in_features)``), drawn once on the CPU from ``seed``.

    Example::

        >>> Gaussian(10, 300, seed=0)(torch.randn(4, 10)).shape
        torch.Size([4, 300])
    """

    def __init__(self, in_features: int, out_features: int, *, seed: int = 0, std: float | None = None) -> None:
        super().__init__(in_features, out_features, seed=seed)
        self.std = default_std(in_features) if std is None else float(std)
        # Drawn on the CPU, so checked there; the engine checks the target device before moving it.
        check_fits_in_memory(
            f"A dense Gaussian projector of {in_features} x {out_features}", in_features * out_features * 4
        )
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(in_features, out_features, generator=generator).mul_(self.std)
        self.register_buffer("weight", weight, persistent=False)

    def settings(self) -> dict:
        return {**super().settings(), "std": self.std}

    def forward(self, error: Tensor) -> Tensor:
        return error @ self.weight.to(error.dtype)
