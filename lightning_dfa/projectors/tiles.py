"""Counter-based Gaussian matrices: any rectangle of a huge random matrix, regenerated on demand, on any device.

Entry ``(2p or 2p + 1, c)`` of stream ``s`` is Box-Muller on a SplitMix64 hash of ``(seed, s, p, c)`` in torch
integer operations: it never depends on the rectangle, tile, process or device (the float32 transcendentals may
differ in the last bit between CPU and GPU). ``"cpu"`` and ``"device"`` are the legacy ``torch.randn`` block generators.

Example::

    >>> w = gaussian_region(seed=0, stream=0, rows=(0, 10), cols=(0, 300), std=0.1)
    >>> torch.equal(w[3:7, 100:200], gaussian_region(0, 0, (3, 7), (100, 200), std=0.1))
    True
"""

from __future__ import annotations

import concurrent.futures
import functools
import math

import torch
from torch import Tensor

#: Generation granularity of the legacy generators (rows and columns of one seeded block). Never change it.
BLOCK = 512
#: Generators: ``"counter"`` (default: the counter-based hash, fast and identical on every device up to the
#: float32 ulp of its transcendental functions), and the legacy ``"cpu"`` and ``"device"`` block generators.
GENERATORS = ("counter", "cpu", "device")
DEFAULT_GENERATOR = "counter"
_MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, the Weyl increment of SplitMix64
_MIX = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB))
#: Hash elements per piece of work on the CPU: fewer than torch's parallel grain (32768), so every operation
#: runs in one thread, on data that stays in cache; pieces are spread over a thread pool.
CPU_PIECE = 32767
#: Hash elements per piece on other devices (bounds the working memory: 16 bytes per element, 32 MB).
DEVICE_PIECE = 1 << 21


def mix64(x: int) -> int:
    """The SplitMix64 output function on a Python integer (unsigned 64-bit): :func:`mix64_`'s reference."""
    for shift, multiplier in _MIX:
        x = ((x ^ (x >> shift)) * multiplier) & _MASK64
    return x ^ (x >> 31)


def splitmix64(x: int) -> int:
    """One step of the SplitMix64 mixer (Steele et al. 2014): a bijective, well-mixed 64-bit hash."""
    return mix64((x + GAMMA) & _MASK64)


def mix_seed(*counters: int) -> int:
    """A 63-bit generator seed derived from a sequence of non-negative integers (seed, stream, row, col...)."""
    state = 0
    for counter in counters:
        state = splitmix64(state ^ splitmix64(counter & _MASK64))
    return state >> 1


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


def mix64_(z: Tensor, scratch: Tensor) -> Tensor:
    """In place on int64 ``z``: the SplitMix64 output function in unsigned 64-bit arithmetic (int64 products wrap
    like unsigned ones; each right shift is masked to a logical one). ``scratch``: same shape."""
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(z, shift, out=scratch)
        z.bitwise_xor_(scratch.bitwise_and_((1 << (64 - shift)) - 1)).mul_(_signed(multiplier))
    torch.bitwise_right_shift(z, 31, out=scratch)
    return z.bitwise_xor_(scratch.bitwise_and_((1 << 33) - 1))


def _row_keys(key: int, pairs: Tensor) -> Tensor:
    """The 64-bit keys of the row pairs ``pairs`` (int64 indices)."""
    z = pairs.mul(_signed(GAMMA)).add_(_signed(key))
    return mix64_(z, torch.empty_like(z))


def _column_terms(cols: tuple[int, int], device: torch.device) -> Tensor:
    return torch.arange(cols[0], cols[1], dtype=torch.int64, device=device).mul_(_signed(GAMMA))


def counter_bits(
    seed: int, stream: int, pairs: tuple[int, int], cols: tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """The raw 64-bit hashes (int64) of row pairs ``[p0, p1)`` and columns ``[c0, c1)``, exact on every device:
    entry ``(p, c)`` gives the Gaussians at rows ``2p`` and ``2p + 1`` of column ``c``."""
    device = torch.device("cpu") if device is None else torch.device(device)
    key = mix_seed(seed, stream)
    z = _column_terms(cols, device)[None, :] + _row_keys(key, torch.arange(*pairs, device=device))[:, None]
    return mix64_(z, torch.empty_like(z))


def counter_bits_reference(seed: int, stream: int, pair: int, col: int) -> int:
    """:func:`counter_bits` of one entry in Python integers (unsigned): the specification of the integer stream."""
    row_key = mix64((mix_seed(seed, stream) + pair * GAMMA) & _MASK64)
    return mix64((row_key + col * GAMMA) & _MASK64)


def _gaussian_pairs(bits: Tensor, half: Tensor, out_cos: Tensor, out_sin: Tensor, std: float) -> None:
    """Box-Muller from the int64 hashes ``bits`` ``(P, W)`` into float32 ``out_cos``, ``out_sin``; ``half``: scratch."""
    words = bits.view(torch.int32).view(*bits.shape, 2)  # little-endian: [..., 0] low, [..., 1] high word
    # Uniforms from 23 bits: OR-ed into the mantissa of 1.0 they give a float32 in [1, 2), exactly.
    high = out_sin.view(torch.int32)
    torch.bitwise_right_shift(words[..., 1], 9, out=high).bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000)
    radius = out_sin.neg_().add_(2.0).log_().mul_(-2.0 * std * std).sqrt_()  # std sqrt(-2 log u1), u1 in (0, 1]
    torch.bitwise_right_shift(words[..., 0], 9, out=half).bitwise_and_(0x7FFFFF).bitwise_or_(0x3F800000)
    angle = half.view(torch.float32).mul_(2.0 * math.pi)  # 2 pi (1 + u2)
    torch.cos(angle, out=out_cos).mul_(radius)
    radius.mul_(angle.sin_())


def _counter_region(seed: int, stream: int, rows: tuple[int, int], cols: tuple[int, int], std: float, out: Tensor):
    """Fill ``out`` (float32, ``(r1 - r0, c1 - c0)``) with the counter generator's entries."""
    (r0, r1), (c0, c1) = rows, cols
    p0, p1 = r0 // 2, (r1 + 1) // 2  # row pairs covering the rows
    width, device = c1 - c0, out.device
    row_keys = _row_keys(mix_seed(seed, stream), torch.arange(p0, p1, device=device))
    col_terms = _column_terms(cols, device)
    piece = CPU_PIECE if device.type == "cpu" else DEVICE_PIECE
    step = max(1, piece // width)  # row pairs per piece (a piece is at least one row pair)
    aligned = r0 % 2 == 0 and r1 % 2 == 0

    def work(start: int) -> None:
        stop = min(start + step, p1 - p0)
        shape = (stop - start, width)
        bits = torch.empty(shape, dtype=torch.int64, device=device)
        scratch = torch.empty_like(bits)
        torch.add(col_terms[None, :], row_keys[start:stop, None], out=bits)
        mix64_(bits, scratch)
        half = scratch.view(-1).view(torch.int32)[: bits.numel()].view(shape)  # scratch is free: reuse it
        if aligned:
            pairs = out[2 * start : 2 * stop].view(stop - start, 2, width)
            _gaussian_pairs(bits, half, pairs[:, 0], pairs[:, 1], std)
            return
        both = torch.empty(stop - start, 2, width, device=device)
        _gaussian_pairs(bits, half, both[:, 0], both[:, 1], std)
        first, last = 2 * (p0 + start), 2 * (p0 + stop)  # rows held by `both`
        top, bottom = max(first, r0), min(last, r1)
        out[top - r0 : bottom - r0] = both.view(-1, width)[top - first : bottom - first]

    starts = range(0, p1 - p0, step)
    if device.type == "cpu" and len(starts) > 1 and torch.get_num_threads() > 1:
        list(_pool().map(work, starts))
    else:
        for start in starts:
            work(start)


def gaussian_rows(
    seed: int, stream: int, rows: Tensor, cols: tuple[int, int], std: float = 1.0, *, out: Tensor | None = None
) -> Tensor:
    """Rows ``rows`` (int64 indices, any order) and columns ``[c0, c1)`` of the counter generator's matrix: the
    entries of :func:`gaussian_region` bit for bit, generating only those rows (``out``: filled if given).
    """
    (c0, c1), device = cols, rows.device
    if not 0 <= c0 < c1:
        raise ValueError(f"Empty or negative columns {cols}.")
    width = c1 - c0
    out = torch.empty(rows.numel(), width, device=device) if out is None else out
    if rows.numel() == 0:
        return out
    key, col_terms = mix_seed(seed, stream), _column_terms(cols, device)
    step = max(1, (CPU_PIECE if device.type == "cpu" else DEVICE_PIECE) // width)
    for start in range(0, rows.numel(), step):
        index = rows[start : start + step]
        bits = torch.add(col_terms[None, :], _row_keys(key, index.div(2, rounding_mode="floor"))[:, None])
        scratch = torch.empty_like(bits)
        mix64_(bits, scratch)
        half = scratch.view(-1).view(torch.int32)[: bits.numel()].view(bits.shape)
        both = torch.empty(2, *bits.shape, device=device)
        _gaussian_pairs(bits, half, both[0], both[1], std)
        torch.where((index % 2 == 1)[:, None], both[1], both[0], out=out[start : start + step])
    return out


def gaussian_region(
    seed: int,
    stream: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    std: float = 1.0,
    *,
    device: torch.device | str | None = None,
    generator: str = DEFAULT_GENERATOR,
    out: Tensor | None = None,
) -> Tensor:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of the virtual ``N(0, std^2)`` matrix, float32 on ``device``
    (filled into ``out`` if given: float32, contiguous, on ``device``).
    """
    (r0, r1), (c0, c1) = rows, cols
    if not (0 <= r0 < r1 and 0 <= c0 < c1):
        raise ValueError(f"Empty or negative region rows={rows}, cols={cols}.")
    if generator not in GENERATORS:
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
    device = torch.device("cpu") if device is None else torch.device(device)
    if out is not None and (out.shape != (r1 - r0, c1 - c0) or out.dtype != torch.float32 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 tensor of shape {(r1 - r0, c1 - c0)}.")
    if generator == "counter":
        out = torch.empty(r1 - r0, c1 - c0, device=device) if out is None else out
        _counter_region(seed, stream, rows, cols, std, out)
        return out
    legacy = _legacy_region(seed, stream, rows, cols, std, device, generator)
    return legacy if out is None else out.copy_(legacy)


def _legacy_region(seed, stream, rows, cols, std, device, generator) -> Tensor:
    (r0, r1), (c0, c1) = rows, cols
    draw_on = device if generator == "device" else torch.device("cpu")
    out = torch.empty(r1 - r0, c1 - c0, device=draw_on)
    jobs = [
        (bi, bj) for bi in range(r0 // BLOCK, (r1 - 1) // BLOCK + 1) for bj in range(c0 // BLOCK, (c1 - 1) // BLOCK + 1)
    ]

    def fill(job: tuple[int, int]) -> None:
        bi, bj = job
        generator = torch.Generator(device=draw_on).manual_seed(mix_seed(seed, stream, bi, bj))
        block = torch.randn(BLOCK, BLOCK, generator=generator, device=draw_on)
        top, bottom = max(r0, bi * BLOCK), min(r1, (bi + 1) * BLOCK)
        left, right = max(c0, bj * BLOCK), min(c1, (bj + 1) * BLOCK)
        out[top - r0 : bottom - r0, left - c0 : right - c0] = block[
            top - bi * BLOCK : bottom - bi * BLOCK, left - bj * BLOCK : right - bj * BLOCK
        ]

    for job in jobs:
        fill(job)
    if std != 1.0:
        out.mul_(std)
    return out.to(device, non_blocking=True)


@functools.lru_cache(maxsize=1)
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    # torch operations release the GIL, so pieces are computed in parallel on the CPU's cores.
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))
