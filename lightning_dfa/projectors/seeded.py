"""Seeded Gaussian feedback: the dense Gaussian's distribution, regenerated tile by tile, never stored."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.checks import check_error
from lightning_dfa.projectors.gaussian import default_std
from lightning_dfa.projectors.tiles import BLOCK, DEFAULT_GENERATOR, GENERATORS, gaussian_region


def round_tile(tile: int) -> int:
    """A tile size rounded up to a multiple of ``BLOCK`` (512); the matrix does not depend on it."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}.")
    return -(-tile // BLOCK) * BLOCK


class SeededGaussian(Projector):
    """``e @ B`` with ``B`` i.i.d. ``N(0, std^2)`` (``std = 1/sqrt(in_features)``), regenerated on every call.

    ``B`` is never stored: each call regenerates it ``tile x tile`` entries at a time (:mod:`~.tiles`, on the error's
    device), in one tile of memory plus an ``N x tile`` accumulator; ``tile`` does not change the matrix.

    Example::

        >>> small = SeededGaussian(10, 300, seed=0)
        >>> torch.allclose(small(torch.eye(10)), small.materialize())
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed: int = 0,
        std: float | None = None,
        tile: int = 4096,
        generator: str = DEFAULT_GENERATOR,
    ) -> None:
        super().__init__(in_features, out_features, seed=seed)
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
        self.std = default_std(in_features) if std is None else float(std)
        self.tile = round_tile(tile)
        self.generator = generator
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    def settings(self) -> dict:
        # ``tile`` does not change the matrix, so a run may resume with other values.
        return {**super().settings(), "std": self.std, "generator": self.generator}

    def weight_tile(self, rows: tuple[int, int], cols: tuple[int, int], device=None, out=None) -> Tensor:
        """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of the (virtual) feedback matrix, float32 (into ``out``)."""
        device = self._device_anchor.device if device is None else device
        return gaussian_region(self.seed, 0, rows, cols, self.std, device=device, generator=self.generator, out=out)

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole ``(in_features, out_features)`` matrix (small sizes only): what :meth:`forward` multiplies by."""
        return self.weight_tile((0, self.in_features), (0, self.out_features)).to(dtype)

    def forward(self, error: Tensor) -> Tensor:
        bad_rows = check_error(type(self).__name__, error, self.in_features)
        rows = error.shape[0]
        out = error.new_empty(rows, self.out_features)
        height, width = min(self.tile, self.in_features), min(self.tile, self.out_features)
        buffer = torch.empty(height * width, device=error.device)  # one tile, reused
        acc = error.new_empty(rows * width)
        for c0 in range(0, self.out_features, self.tile):
            c1 = min(c0 + self.tile, self.out_features)
            part = acc[: rows * (c1 - c0)].view(rows, c1 - c0)
            for r0 in range(0, self.in_features, self.tile):
                r1 = min(r0 + self.tile, self.in_features)
                weight = buffer[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                weight = self.weight_tile((r0, r1), (c0, c1), error.device, out=weight).to(error.dtype)
                if r0 == 0:
                    torch.mm(error[:, r0:r1], weight, out=part)
                else:
                    part.addmm_(error[:, r0:r1], weight)
            out[:, c0:c1] = part
        if bad_rows is not None:
            out[bad_rows] = float("nan")
        return out
