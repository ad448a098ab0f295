"""A user-supplied feedback matrix, to reproduce another library's result with its very matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_dfa.projectors.base import Projector


class Matrix(Projector):
    """Feedback ``e @ matrix`` for a given ``(d_e, d_fb)`` matrix, used as is and saved in the state dict.

    Example::

        >>> B = torch.rand(10, 300) * 2 - 1          # TinyDFA's U[-1, 1)
        >>> dfa = DFA(blocks="blocks.*", output="head", projector=B / 300 ** 0.5)
    """

    def __init__(self, matrix: Tensor) -> None:
        check_matrix(matrix)
        super().__init__(matrix.shape[0], matrix.shape[1])
        self.register_buffer("matrix", matrix.detach().clone())

    def settings(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def forward(self, error: Tensor) -> Tensor:
        return error @ self.matrix.to(error.dtype)


def check_matrix(matrix: Tensor) -> None:
    """Refuse a feedback matrix that is not 2-d, not floating point, or not finite."""
    if not isinstance(matrix, Tensor) or matrix.ndim != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(
            f"A feedback matrix must be 2-d, (error size, sum of the feedback points' sizes); got shape {shape}. "
            "Reshape it, or pass a projector name such as 'gaussian'."
        )
    if not torch.is_floating_point(matrix):
        raise TypeError(f"A feedback matrix must be floating point, got {matrix.dtype}: pass matrix.float().")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            "A feedback matrix must hold finite values, but this one has NaN or inf entries: draw it again, or "
            "replace them (torch.nan_to_num)."
        )
