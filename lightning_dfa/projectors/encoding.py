"""Input encoding for the OPU: a real error becomes binary frames for the micromirror device (DMD).

The DMD displays 0/1 patterns only, so an error row ``e`` is written as ``e ~ sum_f w_f x_f`` with
binary frames ``x_f`` and per-row real weights ``w_f`` (applied electronically after the optics).
The positive and the negative part of ``e`` get frames and weights of their own: an error such as a
softmax minus a one-hot (one large negative entry, many small positive ones) keeps both parts.

* ``"ternary"``: ``e ~ a_p p - a_n n``, ``p = [e > t_p]``, ``n = [e < -t_n]``, two frames. ``a_p`` and
  ``a_n`` are least-squares weights (the mean of ``|e|`` over each frame's pixels: the best fit with that
  support). The threshold is ``threshold`` times the row's root-mean-square (``threshold_of="row"``) or
  ``threshold`` itself (``"absolute"``).
* ``"bitplanes"``: ``k`` bit planes of the positive and of the negative part, ``2k`` frames: each part's
  ``|e_i|`` is rounded to ``k`` bits of that part's peak, so every entry is within ``peak / (2 (2^k - 1))``.
  With a ``dither`` generator the rounding is stochastic (up with probability the fractional part): every
  entry within one level, and the expected decoded error is the error itself, so the expected projection is
  the exact one. With ``k = 1`` an entry is lit with probability ``|e_i| / peak`` and weighted by the peak.
* ``None``: the real error itself, one "frame" (not realisable on a binary DMD; for audits).

Binary frames are ``bool`` tensors: a quarter of the memory of float frames.

Example::

    >>> frames = encode(torch.tensor([[0.9, -0.1, -1.2]]), "ternary", threshold=0.5)
    >>> frames.frames.dtype, frames.decode()
    (torch.bool, tensor([[ 0.9000,  0.0000, -1.2000]]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ENCODINGS = ("ternary", "bitplanes", None)
#: The OPU's input encoding, read by the emulator, the cost model and the ledger alike: one dithered bit plane
#: per sign (unbiased; 2 binary frames per vector, as ternary).
DEFAULT_ENCODING = "bitplanes"
DEFAULT_BITS = 1
THRESHOLD_REFERENCES = ("row", "absolute")


@dataclass
class Frames:
    """Frames ``(F, N, d)`` (``bool``, or the real error for ``encoding=None``) and per-row weights ``(F, N, 1)``:
    ``e ~ (weights * frames).sum(0)``."""

    frames: Tensor
    weights: Tensor

    def decode(self, rows: slice = slice(None)) -> Tensor:
        """The error these frames represent (what the optics effectively project), for the rows ``rows``."""
        frames, weights = self.frames[:, rows], self.weights[:, rows]
        error = torch.zeros(frames.shape[1:], dtype=weights.dtype, device=weights.device)
        for weight, frame in zip(weights, frames):  # frame by frame: no (F, N, d) float temporary
            if frame.dtype == torch.bool:  # weight x 0 or 1 is exact: one fused op gives the same sum, 2 x faster
                error.addcmul_(weight, frame.view(torch.uint8))
            else:
                error += weight * frame
        return error


def binary_frames(encoding: str | None = DEFAULT_ENCODING, bits: int = DEFAULT_BITS) -> int:
    """Binary frames per error vector: 2 for ternary, ``2 * bits`` for bit planes, 1 for the analog reference."""
    check_encoding(encoding, bits)
    return {"ternary": 2, "bitplanes": 2 * bits, None: 1}[encoding]


def check_encoding(
    encoding: str | None, bits: int = DEFAULT_BITS, threshold: float = 0.5, threshold_of: str = "row"
) -> None:
    """Raise a clear error for an unknown encoding, a bad number of bit planes or a bad threshold."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}.")
    if encoding == "bitplanes" and (not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 24):
        raise ValueError(f"bits (bit planes per sign) must be an integer in [1, 24], got {bits!r}.")
    if threshold_of not in THRESHOLD_REFERENCES:
        raise ValueError(f"threshold_of must be one of {THRESHOLD_REFERENCES}, got {threshold_of!r}.")
    if not threshold >= 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}.")


def encode(
    error: Tensor,
    encoding: str | None,
    *,
    threshold: float = 0.5,
    threshold_of: str = "row",
    bits: int = DEFAULT_BITS,
    dither: torch.Generator | None = None,
    rows: int = 64,
) -> Frames:
    """Encode the rows of a finite ``(N, d)`` error as frames (see the module doc), ``rows`` rows at a time so
    that the float temporaries stay small beside the ``bool`` frames. ``dither``: bit planes round stochastically
    with this generator (unbiased: ``E[decode] = e``)."""
    check_encoding(encoding, bits, threshold, threshold_of)
    if encoding is None:
        return Frames(error.unsqueeze(0), torch.ones_like(error[None, :, :1]))
    count = binary_frames(encoding, bits)
    frames = torch.empty(count, *error.shape, dtype=torch.bool, device=error.device)
    weights = error.new_empty(count, error.shape[0], 1)
    for r0 in range(0, error.shape[0], rows):
        chunk = slice(r0, r0 + rows)
        if encoding == "ternary":
            _ternary(error[chunk], frames[:, chunk], weights[:, chunk], threshold, threshold_of)
        else:
            _bitplanes(error[chunk], frames[:, chunk], weights[:, chunk], bits, dither)
    return Frames(frames, weights)


def ternarize(error: Tensor, threshold: float = 0.5, threshold_of: str = "row") -> Frames:
    """Frames ``[p, n]`` with weights ``[a_p, -a_n]``: ``e ~ a_p p - a_n n`` (see the module doc)."""
    return encode(error, "ternary", threshold=threshold, threshold_of=threshold_of)


def bitplanes(error: Tensor, bits: int = 4) -> Frames:
    """``2 * bits`` frames: the bits of ``round(|e| / peak * (2^bits - 1))`` of the positive and negative parts."""
    return encode(error, "bitplanes", bits=bits)


def _ternary(error: Tensor, frames: Tensor, weights: Tensor, threshold: float, threshold_of: str) -> None:
    for i, part in enumerate((error.clamp_min(0), error.neg().clamp_min(0))):
        torch.gt(part, _threshold(error, threshold, threshold_of), out=frames[i])
        lit = frames[i].sum(1, keepdim=True)
        weights[i] = part.mul_(frames[i]).sum(1, keepdim=True) / lit.clamp_min(1)
    weights[1].neg_()


def _threshold(error: Tensor, threshold: float, threshold_of: str) -> Tensor | float:
    if threshold_of == "absolute":
        return threshold
    return torch.linalg.vector_norm(error, dim=1, keepdim=True).mul_(threshold / error.shape[1] ** 0.5)


def _bitplanes(error: Tensor, frames: Tensor, weights: Tensor, bits: int, dither: torch.Generator | None) -> None:
    levels = (1 << bits) - 1
    for s, (sign, part) in enumerate(((1.0, error.clamp_min(0)), (-1.0, error.neg().clamp_min_(0)))):
        peak = part.amax(1, keepdim=True)
        scaled = part.div_(peak.clamp_min(torch.finfo(error.dtype).tiny))
        if levels > 1:  # (times 1 changes nothing)
            scaled.mul_(levels)
        if dither is None:
            codes = scaled.round_()
        else:  # stochastic rounding: up with probability the fractional part
            codes = scaled.add_(torch.rand(scaled.shape, generator=dither, device=scaled.device)).floor_()
        if bits == 1:  # codes 0, 1 or (1 + u rounded up to 2) 2: the bit is set for 1 only
            torch.eq(codes, 1.0, out=frames[s])
        else:
            codes = codes.to(torch.int32)  # at most 2^24: exact
            for bit in range(bits):
                torch.ne(codes & (1 << bit), 0, out=frames[s * bits + bit])
        for bit in range(bits):
            weights[s * bits + bit] = sign * peak * (2**bit / levels)


def encoding_error(error: Tensor, frames: Frames, rows: int = 64, relative: bool = True) -> float:
    """``|e - decode(frames)| / |e|`` over the batch (0 for an all-zero batch; ``|e - decode|`` if not ``relative``),
    ``rows`` rows at a time."""
    squared = sum(
        float((error[r0 : r0 + rows] - frames.decode(slice(r0, r0 + rows))).pow(2).sum())
        for r0 in range(0, error.shape[0], rows)
    )
    if not relative:
        return squared**0.5
    norm = float(error.norm())
    return squared**0.5 / norm if norm else 0.0
