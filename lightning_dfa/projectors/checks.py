"""Input checks shared by the projector kinds: shape, NaN or infinite rows, and memory."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def check_error(name: str, error: Tensor, in_features: int) -> Tensor | None:
    """Check an error batch ``(N, in_features)``; return the mask of non-finite rows (their feedback is NaN, with
    a warning; a DFA run never sends one), or None if all are finite."""
    if error.ndim != 2 or error.shape[1] != in_features:
        raise ValueError(f"{name} expects errors of shape (N, {in_features}), got {tuple(error.shape)}.")
    if not torch.is_floating_point(error):
        raise TypeError(f"{name} expects a floating-point error, got {error.dtype}.")
    bad = nonfinite_rows(error)
    if bad is not None:
        count = int(bad.sum())
        warnings.warn(
            f"{name}: {count} error rows are not finite; their feedback is NaN.", RuntimeWarning, stacklevel=3
        )
    return bad


def nonfinite_rows(rows: Tensor) -> Tensor | None:
    """The mask of the rows of ``rows`` (N, d) holding a NaN or an infinity, or None if every row is finite.

    A row with a NaN or an infinity has a non-finite sum; a finite row's sum can only overflow, so the rows
    flagged by the sums are checked exactly. This costs one read of the rows and O(N) memory."""
    finite = torch.isfinite(rows.sum(dim=1))
    if bool(finite.all()):
        return None
    suspects = (~finite).nonzero().flatten()
    finite[suspects] = torch.isfinite(rows[suspects]).all(dim=1)
    return None if bool(finite.all()) else ~finite


def check_fits_in_memory(what: str, nbytes: int, device: torch.device | str = "cpu") -> None:
    """Raise ``MemoryError`` before allocating ``nbytes`` that the device cannot hold, naming the projectors that
    store no matrix (instead of the allocator's message from inside the first forward pass)."""
    device = torch.device(device)
    available = _available_bytes(device)
    if available is None or nbytes <= available:
        return
    raise MemoryError(
        f"{what} needs {nbytes / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory available on "
        f"{device}. Use a projector that stores no matrix: projector='seeded' (the same Gaussian, regenerated "
        "tile by tile from the seed) or projector='structured' (a fast structured transform)."
    )


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:  # MemAvailable counts the reclaimable page cache; the free pages alone would refuse too early
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no check, the allocator's own error
        return None
