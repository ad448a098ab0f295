"""Seeded Gaussian feedback: the dense Gaussian's distribution, regenerated tile by tile, never stored."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.checks import check_error, check_nonfinite_mode
from lightning_dfa.projectors.gaussian import default_std
from lightning_dfa.projectors.tiles import BLOCK, GENERATORS, gaussian_region


def round_tile(tile: int) -> int:
    """A tile size rounded up to a whole number of generation blocks (``BLOCK``)."""
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}.")
    return -(-tile // BLOCK) * BLOCK


class SeededGaussian(Projector):
    """``e @ B`` with ``B`` i.i.d. ``N(0, std^2)`` (``std = 1/sqrt(in_features)``), regenerated on every call.

    ``B`` is never stored: each call draws it again, ``tile x tile`` entries at a time, from
    counter-seeded blocks (:mod:`lightning_dfa.projectors.tiles`). Memory is one tile (64 MB at the
    default ``tile=4096`` in float32) whatever the size; the time is that of the dense matmul plus
    drawing the matrix (``in_features * out_features`` normal numbers per call). The matrix depends on
    ``seed`` only: not on ``tile``, the process, or the device (with the default ``generator="cpu"``,
    which draws on the CPU and copies; ``generator="device"`` draws on the GPU, faster, and is then
    reproducible on the same kind of device only).

    Example::

        >>> B = SeededGaussian(50257, 49152, seed=0)           # 9.9 GB if stored; here 64 MB at a time
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
        generator: str = "cpu",
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(in_features, out_features, seed=seed)
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
        self.std = default_std(in_features) if std is None else float(std)
        self.tile = round_tile(tile)
        self.generator = generator
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)  # follows .to(device)

    def settings(self) -> dict:
        # ``tile`` and ``nonfinite`` do not change the matrix, so a run may resume with other values.
        return {**super().settings(), "std": self.std, "generator": self.generator}

    def weight_tile(self, rows: tuple[int, int], cols: tuple[int, int], device: torch.device | None = None) -> Tensor:
        """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of the (virtual) feedback matrix, float32."""
        device = self._device_anchor.device if device is None else device
        return gaussian_region(self.seed, 0, rows, cols, self.std, device=device, generator=self.generator)

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole ``(in_features, out_features)`` matrix (small sizes only): what :meth:`forward` multiplies by."""
        return self.weight_tile((0, self.in_features), (0, self.out_features)).to(dtype)

    def forward(self, error: Tensor) -> Tensor:
        bad_rows = check_error(type(self).__name__, error, self.in_features, self.nonfinite)
        out = error.new_empty(error.shape[0], self.out_features)
        for c0 in range(0, self.out_features, self.tile):
            c1 = min(c0 + self.tile, self.out_features)
            acc = None
            for r0 in range(0, self.in_features, self.tile):
                r1 = min(r0 + self.tile, self.in_features)
                part = error[:, r0:r1] @ self.weight_tile((r0, r1), (c0, c1), error.device).to(error.dtype)
                acc = part if acc is None else acc.add_(part)
            out[:, c0:c1] = acc
        if bad_rows is not None:
            out[bad_rows] = float("nan")
        return out
