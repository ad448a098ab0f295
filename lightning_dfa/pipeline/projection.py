"""Each stage's share of the feedback projection: the columns of the shared seeded matrix that feed its blocks.

The layout gives every point a column slice of ``B`` (``d_e x sum d_i``). A stage needs ``B[:, columns]`` only:
the seeded Gaussian regenerates just those tiles, the dense Gaussian and a user matrix keep just those columns
(the dense Gaussian is drawn whole once, on the CPU, to take them), and any other projector (structured, OPU, a
user module) runs whole and keeps its columns of the result: what the one-process engine computes, sliced.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_dfa.projectors.gaussian import Gaussian
from lightning_dfa.projectors.matrix import Matrix
from lightning_dfa.projectors.seeded import SeededGaussian


class StageProjection(nn.Module):
    """``e -> (e @ B)[:, columns]`` for one stage, from the projector the one-process engine would build.

    Example::

        full = build_projector("seeded", 10, 300, seed=0)
        part = StageProjection(full, slice(100, 200))
        torch.equal(part.matrix_columns(), full.materialize()[:, 100:200])   # True
    """

    def __init__(self, projector: nn.Module, columns: slice) -> None:
        super().__init__()
        self.columns = columns
        self.in_features = projector.in_features
        self.out_features = columns.stop - columns.start
        self.kind = "sliced output"
        self._seeded: SeededGaussian | None = None
        self._full: nn.Module | None = None
        # Exact types: a subclass may compute otherwise (its own forward), so it runs whole.
        if type(projector) is SeededGaussian:
            self._seeded, self.kind = projector, "seeded columns"
        elif type(projector) in (Gaussian, Matrix):
            weight = projector.weight if isinstance(projector, Gaussian) else projector.matrix
            self.register_buffer("weight", weight[:, columns].clone(), persistent=False)
            self.kind = "stored columns"
        else:
            self._full = projector

    def forward(self, error: Tensor) -> Tensor:
        if self._full is not None:
            return self._full(error)[:, self.columns]
        if self._seeded is None:
            return error @ self.weight.to(error.dtype)
        return self._seeded_columns(error)

    def _seeded_columns(self, error: Tensor) -> Tensor:
        seeded, (c0, c1) = self._seeded, (self.columns.start, self.columns.stop)
        out = error.new_empty(error.shape[0], c1 - c0)
        for start in range(c0, c1, seeded.tile):
            stop = min(start + seeded.tile, c1)
            part = None
            for r0 in range(0, seeded.in_features, seeded.tile):
                r1 = min(r0 + seeded.tile, seeded.in_features)
                weight = seeded.weight_tile((r0, r1), (start, stop), error.device).to(error.dtype)
                product = error[:, r0:r1] @ weight
                part = product if part is None else part.add_(product)
            out[:, start - c0 : stop - c0] = part
        return out

    @torch.no_grad()
    def matrix_columns(self) -> Tensor:
        """``B[:, columns]`` as this stage uses it (small sizes: audits and tests)."""
        if self._seeded is not None:
            return self._seeded.weight_tile((0, self.in_features), (self.columns.start, self.columns.stop))
        if self._full is not None:
            return self._full(torch.eye(self.in_features))[:, self.columns]
        return self.weight
