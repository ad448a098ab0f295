"""Structured feedback: random signs, fast Walsh-Hadamard mixing and Gaussian diagonals (Fastfood-like).

For errors padded to ``n = 2^ceil(log2 d_e)`` entries, output block ``b`` (``n`` feedback entries,
the last one cut to size) is::

    y_b = s * H G_b P_b H D x          s = 1 / sqrt(n * d_e)

with ``D`` random signs, ``H`` the (unnormalised, +-1) Walsh-Hadamard transform, ``P_b`` a random
permutation and ``G_b`` a diagonal of ``N(0, 1)`` gains. ``u = H D x`` is shared by all blocks, so a
call costs ``1 + ceil(d_fb / n)`` transforms of size ``n``: ``O(N (d_e + d_fb) log d_e)`` time and
``O(d_e + d_fb)`` memory for the signs, gains and permutations (plus a bounded working buffer).

Shared with the dense Gaussian (``Gaussian``):
  * every entry of the materialised matrix is exactly ``N(0, 1/d_e)`` (it is linear in the gains
    ``G_b`` with coefficients ``+-s``, ``n`` of them), the library's scale convention;
  * entries of one column are pairwise uncorrelated, and so are entries of one row;
  * for any error ``x``, each feedback entry is exactly Gaussian with variance ``|x|^2 / d_e`` (given
    the signs and permutations), so ``E |y|^2 = d_fb |x|^2 / d_e`` and norms concentrate as a
    Johnson-Lindenstrauss map's do (``H D`` spreads ``x`` so that no single gain dominates).
Not shared:
  * independence: the ``d_e x d_fb`` entries are functions of only ``d_fb`` gains, ``n`` signs and the
    permutations. Within an output block all columns have exactly the same norm, and pairs of
    entries in different rows and columns have small (``O(1/sqrt(n))``) but non-zero correlations;
  * a column's norm is ``chi`` with ``n`` rather than ``d_e`` degrees of freedom when ``d_e`` is padded.
Use ``Gaussian``/``SeededGaussian`` when exact i.i.d. entries matter (audits, theory checks).

Example::

    >>> B = Structured(50257, 49152, seed=0)    # O(d) memory, ~2 transforms of 65536 per row
    >>> B(torch.randn(8, 50257)).shape
    torch.Size([8, 49152])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.checks import check_error, check_nonfinite_mode
from lightning_dfa.projectors.tiles import mix_seed

#: Rows x transform-size elements processed at once: bounds the working memory (16 MB in float32).
CHUNK_ELEMENTS = 1 << 22


def hadamard_(x: Tensor) -> Tensor:
    """In place, the unnormalised fast Walsh-Hadamard transform of the rows of ``x`` (width a power of two).

    ``H_n`` has entries ``(-1)^popcount(i & j)``; ``H_n @ H_n = n I``. ``O(n log n)`` additions, no extra memory.

    Example::

        >>> hadamard_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        tensor([[1., 1., 1., 1.]])
    """
    rows, n = x.shape
    if n & (n - 1):
        raise ValueError(f"The Hadamard transform needs a power-of-two width, got {n}.")
    half = 1
    while half < n:
        pairs = x.view(rows, n // (2 * half), 2, half)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        a.add_(b)  # a + b
        b.mul_(-2).add_(a)  # (a + b) - 2b = a - b
        half *= 2
    return x


class Structured(Projector):
    """Fast structured random feedback (signs, Hadamard, permutation, Gaussian diagonal); see the module doc.

    ``std`` defaults to ``1/sqrt(in_features)`` like every kind. ``nonfinite`` as in :class:`SeededGaussian`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed: int = 0,
        std: float | None = None,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(in_features, out_features, seed=seed)
        self.std = 1.0 / math.sqrt(in_features) if std is None else float(std)
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self.size = 1 << (in_features - 1).bit_length()  # n, the transform size
        blocks = -(-out_features // self.size)
        generator = torch.Generator().manual_seed(mix_seed(seed, 0x57))
        signs = torch.randint(0, 2, (self.size,), generator=generator).mul_(2).sub_(1).float()
        perms = torch.stack([torch.randperm(self.size, generator=generator) for _ in range(blocks)])
        gains = torch.randn(blocks, self.size, generator=generator)
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("gains", gains, persistent=False)

    def settings(self) -> dict:
        return {**super().settings(), "std": self.std}

    @property
    def scale(self) -> float:
        """``s``: with it every entry of the matrix has standard deviation ``std``."""
        return self.std / math.sqrt(self.size)

    def forward(self, error: Tensor) -> Tensor:
        bad_rows = check_error(type(self).__name__, error, self.in_features, self.nonfinite)
        out = error.new_empty(error.shape[0], self.out_features)
        rows = max(1, CHUNK_ELEMENTS // self.size)
        for start in range(0, error.shape[0], rows):
            self._project(error[start : start + rows], out[start : start + rows])
        if bad_rows is not None:
            out[bad_rows] = float("nan")
        return out

    def _project(self, error: Tensor, out: Tensor) -> None:
        dtype = torch.float64 if error.dtype == torch.float64 else torch.float32  # transforms never in half
        u = torch.zeros(error.shape[0], self.size, dtype=dtype, device=error.device)
        u[:, : self.in_features] = error
        hadamard_(u.mul_(self.signs.to(dtype)))
        for block, (perm, gain) in enumerate(zip(self.perms, self.gains)):
            v = hadamard_(u[:, perm].mul_(gain.to(dtype)))
            c0 = block * self.size
            c1 = min(c0 + self.size, self.out_features)
            out[:, c0:c1] = v[:, : c1 - c0].mul_(self.scale)
