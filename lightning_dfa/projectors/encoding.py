"""Input encoding for the OPU: a real error becomes binary frames for the micromirror device (DMD).

The DMD displays 0/1 patterns only, so an error row ``e`` is written as ``e ~ sum_f w_f x_f`` with
binary frames ``x_f`` and per-row real weights ``w_f`` (applied electronically after the optics):

* ``"ternary"``: ``e ~ a (p - n)``, ``p = [e > t]``, ``n = [e < -t]``, two frames. The threshold ``t``
  is absolute, or relative to the row's root-mean-square (``t = threshold * rms(e)``, the default).
  ``a`` is the least-squares scale ``<e, p - n> / |p - n|^2``: the best ternary approximation with
  that support. For Gaussian-like errors and ``threshold=0.5`` the relative error is about 0.44.
* ``"bitplanes"``: ``k`` bit planes of the positive and of the negative part, ``2k`` frames:
  ``|e_i|`` is rounded to ``k`` bits of ``max|e|``, so every entry is within ``max|e| / (2 (2^k - 1))``.
* ``None``: the real error itself, one "frame" (not realisable on a binary DMD; for audits).

Example::

    >>> frames = encode(torch.tensor([[0.9, -0.1, -1.2]]), "ternary", threshold=0.5)
    >>> frames.frames.shape, frames.decode()
    (torch.Size([2, 1, 3]), tensor([[ 1.0500,  0.0000, -1.0500]]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ENCODINGS = ("ternary", "bitplanes", None)


@dataclass
class Frames:
    """Binary frames ``(F, N, d)`` and their per-row weights ``(F, N, 1)``: ``e ~ (weights * frames).sum(0)``.

    ``residual`` may hold ``|e - decode()|^2`` summed over the rows, when the encoder knows it (ternary does).
    """

    frames: Tensor
    weights: Tensor
    residual: float | None = None

    def decode(self) -> Tensor:
        """The error these frames represent (what the optics effectively project)."""
        return (self.weights * self.frames).sum(0)


def binary_frames(encoding: str | None, bits: int = 4) -> int:
    """Binary frames per error vector: 2 for ternary, ``2 * bits`` for bit planes, 1 for the analog reference."""
    check_encoding(encoding, bits)
    return {"ternary": 2, "bitplanes": 2 * bits, None: 1}[encoding]


def check_encoding(encoding: str | None, bits: int = 4) -> None:
    """Raise a clear error for an unknown encoding or a bad number of bit planes."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}.")
    if encoding == "bitplanes" and (not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 24):
        raise ValueError(f"bits (bit planes per sign) must be an integer in [1, 24], got {bits!r}.")


def encode(
    error: Tensor, encoding: str | None, *, threshold: float = 0.5, relative: bool = True, bits: int = 4
) -> Frames:
    """Encode the rows of a finite ``(N, d)`` error as binary frames (see the module doc)."""
    check_encoding(encoding, bits)
    if encoding == "ternary":
        return ternarize(error, threshold, relative)
    if encoding == "bitplanes":
        return bitplanes(error, bits)
    return Frames(error.unsqueeze(0), torch.ones_like(error[None, :, :1]))


def ternarize(error: Tensor, threshold: float = 0.5, relative: bool = True) -> Frames:
    """Frames ``[p, n]`` with weights ``[a, -a]``: ``e ~ a (p - n)`` (see the module doc).

    The frames are written straight into one ``(2, N, d)`` tensor and the per-row sums are batched dot products,
    so the only full-size memory is the frames themselves; ``Frames.residual`` is ``sum |e|^2 - a <e, p - n>``.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}.")
    if relative:
        t = torch.linalg.vector_norm(error, dim=1, keepdim=True).mul_(threshold / error.shape[1] ** 0.5)
    else:
        t = torch.full_like(error[:, :1], threshold)
    frames = torch.empty(2, *error.shape, dtype=error.dtype, device=error.device)
    torch.gt(error, t, out=frames[0])
    torch.lt(error, t.neg(), out=frames[1])
    dots = torch.einsum("fnd,nd->nf", frames, error)  # (N, 2): <e, p>, <e, n>
    inner = dots[:, :1] - dots[:, 1:]  # <e, p - n>
    scale = inner / frames.sum((0, 2)).unsqueeze(1).clamp_min(1)
    residual = float(torch.linalg.vector_norm(error).pow(2) - (scale * inner).sum())
    return Frames(frames, torch.stack([scale, -scale]), max(residual, 0.0))


def bitplanes(error: Tensor, bits: int = 4) -> Frames:
    """``2 * bits`` frames: the bits of ``round(|e| / max|e| * (2^bits - 1))`` for the positive and negative parts."""
    levels = (1 << bits) - 1
    peak = error.abs().amax(1, keepdim=True)
    codes = torch.round(error.abs() / peak.clamp_min(torch.finfo(error.dtype).tiny) * levels).to(torch.int64)
    frames, weights = [], []
    for sign, part in ((1.0, error > 0), (-1.0, error < 0)):
        for bit in range(bits):
            frames.append(((codes >> bit) & 1).bool().logical_and(part).to(error.dtype))
            weights.append(sign * peak * (2**bit / levels))
    return Frames(torch.stack(frames), torch.stack(weights))


def encoding_error(error: Tensor, frames: Frames) -> float:
    """Relative error ``|e - decode(frames)| / |e|`` over the batch (0 for an all-zero batch)."""
    norm = float(error.norm())
    if norm == 0:
        return 0.0
    if frames.residual is not None:
        return frames.residual**0.5 / norm
    return float((error - frames.decode()).norm()) / norm
