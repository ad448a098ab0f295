"""Counter-seeded Gaussian blocks: any rectangle of a huge random matrix, regenerated on demand.

The virtual matrix is cut into fixed ``BLOCK x BLOCK`` blocks. Block ``(i, j)`` of stream ``s`` is
drawn by ``torch.randn`` from a generator seeded with ``splitmix64``-mixed ``(seed, s, i, j)``, so
any entry depends only on ``(seed, stream, row, column)``: never on which rectangle was asked for,
on the tile size a caller groups blocks into, on the process, or (with the portable CPU generator)
on the device. Nothing is stored; a rectangle costs ``O(rows x cols)`` memory.

Example::

    >>> w = gaussian_region(seed=0, stream=0, rows=(0, 10), cols=(0, 300), std=0.1)
    >>> w.shape
    torch.Size([10, 300])
    >>> torch.equal(w[:, 100:200], gaussian_region(0, 0, (0, 10), (100, 200), std=0.1))
    True
"""

from __future__ import annotations

import concurrent.futures
import functools

import torch
from torch import Tensor

#: Fixed generation granularity (rows and columns of one seeded block). Never change it: matrices depend on it.
BLOCK = 512
#: Where blocks are drawn: ``"cpu"`` (portable: identical on every device) or ``"device"`` (fast on GPUs,
#: reproducible on the same kind of device only).
GENERATORS = ("cpu", "device")
_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer (Steele et al. 2014): a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*counters: int) -> int:
    """A 63-bit generator seed derived from a sequence of non-negative integers (seed, stream, row, col...)."""
    state = 0
    for counter in counters:
        state = splitmix64(state ^ splitmix64(counter & _MASK64))
    return state >> 1


def gaussian_block(
    seed: int, stream: int, block_row: int, block_col: int, device: torch.device | None = None
) -> Tensor:
    """Block ``(block_row, block_col)`` of stream ``stream``: a ``(BLOCK, BLOCK)`` float32 ``N(0, 1)`` tensor.

    Drawn on the CPU unless ``device`` is given (then with that device's own generator).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    generator = torch.Generator(device=device).manual_seed(mix_seed(seed, stream, block_row, block_col))
    return torch.randn(BLOCK, BLOCK, generator=generator, device=device)


def gaussian_region(
    seed: int,
    stream: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    std: float = 1.0,
    *,
    device: torch.device | str | None = None,
    generator: str = "cpu",
) -> Tensor:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of the virtual ``N(0, std^2)`` matrix, float32 on ``device``.

    With ``generator="cpu"`` the blocks are drawn on the CPU (in parallel threads) and copied to ``device``,
    so the result is bit-identical everywhere. With ``generator="device"`` they are drawn on ``device``.
    """
    (r0, r1), (c0, c1) = rows, cols
    if not (0 <= r0 < r1 and 0 <= c0 < c1):
        raise ValueError(f"Empty or negative region rows={rows}, cols={cols}.")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
    device = torch.device("cpu") if device is None else torch.device(device)
    draw_on = device if generator == "device" else torch.device("cpu")
    out = torch.empty(r1 - r0, c1 - c0, device=draw_on)
    jobs = [
        (bi, bj) for bi in range(r0 // BLOCK, (r1 - 1) // BLOCK + 1) for bj in range(c0 // BLOCK, (c1 - 1) // BLOCK + 1)
    ]

    def fill(job: tuple[int, int]) -> None:
        bi, bj = job
        block = gaussian_block(seed, stream, bi, bj, device=draw_on)
        top, bottom = max(r0, bi * BLOCK), min(r1, (bi + 1) * BLOCK)
        left, right = max(c0, bj * BLOCK), min(c1, (bj + 1) * BLOCK)
        out[top - r0 : bottom - r0, left - c0 : right - c0] = block[
            top - bi * BLOCK : bottom - bi * BLOCK, left - bj * BLOCK : right - bj * BLOCK
        ]

    if draw_on.type == "cpu" and len(jobs) > 1:
        list(_pool().map(fill, jobs))
    else:
        for job in jobs:
            fill(job)
    if std != 1.0:
        out.mul_(std)
    return out.to(device, non_blocking=True)


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    # torch.randn releases the GIL, so blocks are drawn in parallel on the CPU's cores.
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
