"""Structured feedback: random signs, fast Walsh-Hadamard mixing and Gaussian diagonals (Fastfood-like).

Output block ``b`` is ``y_b = s H G_b P_b H D x`` on errors padded to a power of two: ``O(N (d_e + d_fb) log d_e)``
time, ``O(d_e + d_fb)`` memory; entries are ``N(0, 1/d_e)`` but not independent (pairs of entries
share the signs and diagonals).

Example::

    >>> B = Structured(50257, 49152, seed=0)    # O(d) memory, ~2 transforms of 65536 per row
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.checks import check_error
from lightning_dfa.projectors.tiles import mix_seed

#: Rows x transform-size elements processed at once: each of the two working buffers holds this many (32 MB).
CHUNK_ELEMENTS = 1 << 23
#: The same on the CPU (4 MB buffers, which stay in cache).
CPU_CHUNK_ELEMENTS = 1 << 20
#: Largest Hadamard factor of the Kronecker decomposition (a power of two).
MAX_FACTOR = 64


def hadamard_factors(n: int) -> list[int]:
    """Powers of two of at most :data:`MAX_FACTOR` whose product is ``n``, as even as possible, largest first."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"The Hadamard transform needs a power-of-two width, got {n}.")
    bits, step = n.bit_length() - 1, MAX_FACTOR.bit_length() - 1
    parts = -(-bits // step)
    return [1 << (bits // parts + (i < bits % parts)) for i in range(parts)]


def sylvester(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The ``n x n`` Sylvester-Hadamard matrix, entries ``(-1)^popcount(i & j)`` (``n`` a power of two)."""
    idx = torch.arange(n, device=device)
    popcount = torch.zeros(n, n, dtype=torch.int64, device=device)
    both = idx[:, None] & idx[None, :]
    while bool(both.any()):
        popcount += both & 1
        both = both >> 1
    return (1 - 2 * (popcount & 1)).to(dtype)


def hadamard(
    x: Tensor, out: Tensor | None = None, factors: list[Tensor] | None = None, columns: int | None = None
) -> Tensor:
    """The unnormalised Walsh-Hadamard transform of the rows of ``x`` (width ``n``, a power of two): ``x @ H_n``.

    One batched product per Kronecker factor (``factors``: the prebuilt Sylvester matrices); ``x`` and ``out`` are
    overwritten as alternate buffers. ``columns=m``: only the first ``m`` output columns are needed (at least
    ``m`` are returned).

    Example::

        >>> hadamard(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        tensor([[1., 1., 1., 1.]])
    """
    rows, n = x.shape
    sizes = hadamard_factors(n)
    if factors is None:
        factors = [sylvester(f, x.dtype, x.device) for f in sizes]
    src = x.contiguous()
    spare = torch.empty_like(src) if out is None else out
    width = n
    for i, (f, h) in enumerate(zip(sizes, factors)):
        if f == 1:
            continue
        rest = width // f
        keep = f if columns is None or i > 0 else min(f, -(-columns // rest))
        dst = spare.view(-1)[: rows * rest * keep].view(rows, rest, keep)
        torch.matmul(src.view(rows, f, rest).transpose(1, 2), h if keep == f else h[:, :keep], out=dst)
        width = rest * keep
        src, spare = dst.view(rows, width), src
    return src


class Structured(Projector):
    """Fast structured random feedback (see the module doc); ``std`` defaults to ``1/sqrt(in_features)``."""

    def __init__(self, in_features: int, out_features: int, *, seed: int = 0, std: float | None = None) -> None:
        super().__init__(in_features, out_features, seed=seed)
        self.std = 1.0 / math.sqrt(in_features) if std is None else float(std)
        self.size = 1 << (in_features - 1).bit_length()  # n, the transform size
        blocks = -(-out_features // self.size)
        generator = torch.Generator().manual_seed(mix_seed(seed, 0x57))
        signs = torch.randint(0, 2, (self.size,), generator=generator).mul_(2).sub_(1).float()
        perms = torch.stack([torch.randperm(self.size, generator=generator) for _ in range(blocks)])
        gains = torch.randn(blocks, self.size, generator=generator)
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("gains", gains, persistent=False)
        for i, f in enumerate(hadamard_factors(self.size)):
            self.register_buffer(f"_hadamard{i}", sylvester(f), persistent=False)

    def settings(self) -> dict:
        return {**super().settings(), "std": self.std}

    @property
    def scale(self) -> float:
        """``s``: with it every entry of the matrix has standard deviation ``std``."""
        return self.std / math.sqrt(self.size)

    def forward(self, error: Tensor) -> Tensor:
        bad_rows = check_error(type(self).__name__, error, self.in_features)
        out = error.new_empty(error.shape[0], self.out_features)
        dtype = torch.float64 if error.dtype == torch.float64 else torch.float32  # transforms never in half
        chunk = min(CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS) if error.device.type == "cpu" else CHUNK_ELEMENTS
        rows = max(1, min(error.shape[0], chunk // self.size))
        group = max(1, min(self.out_features // self.size, chunk // (rows * self.size)))  # full blocks per product
        count = len(hadamard_factors(self.size))
        factors = [getattr(self, f"_hadamard{i}").to(dtype) for i in range(count)]
        signs, gains = self.signs.to(dtype), self.gains.to(dtype) * self.scale
        # H D x and its scratch, plus (several output blocks) a third buffer, or two of `group` blocks each.
        narrow = torch.empty(
            2 + (len(self.gains) > 1 and group == 1), rows * self.size, dtype=dtype, device=error.device
        )
        wide = torch.empty(2, rows * group * self.size, dtype=dtype, device=error.device) if group > 1 else None
        for start in range(0, error.shape[0], rows):
            chunk = error[start : start + rows]
            n = chunk.shape[0]
            views = [b[: n * self.size].view(n, self.size) for b in narrow]
            views[0][:, self.in_features :] = 0
            torch.mul(chunk, signs[: self.in_features], out=views[0][:, : self.in_features])
            u = hadamard(views[0], views[1], factors)  # H D x, shared by all output blocks
            free = [v for v in views if v.data_ptr() != u.data_ptr()]
            self._mix(u, free, wide, gains, factors, out[start : start + n])
        if bad_rows is not None:
            out[bad_rows] = float("nan")
        return out

    def _mix(self, u: Tensor, free: list, wide: Tensor | None, gains: Tensor, factors: list, out: Tensor) -> None:
        """``out = [s H G_b P_b u]_b``, cut to ``out_features``. ``free``: one or two scratch buffers like ``u``;
        ``wide``: two buffers of ``group`` blocks (None: one block at a time, ``u`` the scratch of the last one).
        """
        n, size = u.shape
        blocks, full = len(self.gains), self.out_features // size
        group = 1 if wide is None else wide.shape[1] // (n * size)
        for b0 in range(0, blocks, group):
            b1 = min(b0 + group, full) if b0 < full else blocks  # a partial last block goes alone
            c0, c1 = b0 * size, min(b1 * size, self.out_features)
            if wide is not None:
                src, spare = (w[: n * (b1 - b0) * size].view(n * (b1 - b0), size) for w in wide)
            else:
                src, spare = free[0], u if b1 == blocks else free[1]
            torch.index_select(u, 1, self.perms[b0:b1].flatten(), out=src.view(n, -1))
            src.view(n, b1 - b0, size).mul_(gains[b0:b1])
            columns = c1 - c0 if c1 - c0 < size else None  # only a partial last block is cut short
            v = hadamard(src, spare, factors, columns)
            out[:, c0:c1] = v.view(n, -1)[:, : c1 - c0]
