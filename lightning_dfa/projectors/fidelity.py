"""Step-level fidelity of a projector: how well a step's summed weight gradient survives it, and whether its error
repeats from one step to the next.

A block's DFA weight gradient sums its feedback over the step's vectors, ``G = F^T A`` (``F``: the block's feedback
columns, ``A``: its inputs). Independent noise in ``F`` grows like ``sqrt(N)`` in ``G``; an error shared by the
vectors (a camera's deterministic distortion) grows like ``N`` and, if it points the same way every step, adds up
over training. :func:`step_fidelity` measures both against an exact reference map ``M`` (for the OPU emulator:
``opu.ideal_matrix()``, the same medium without the camera and without the encoding).

Example::

    >>> from lightning_dfa.projectors import OPU
    >>> opu = OPU(64, 32, seed=0)
    >>> steps = [(torch.randn(256, 64), torch.rand(256, 8)) for _ in range(2)]
    >>> _ = opu(steps[0][0][:1])  # the first call chooses the anchor and the exposure
    >>> fidelity = step_fidelity(opu, opu.ideal_matrix(), steps)
    >>> len(fidelity.gradient_cosine), len(fidelity.error_correlation)  # one per step; 1.0 is perfect
    (2, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepFidelity:
    """Per step: mean per-vector cosine of the feedback to ``e @ M``, cosine of ``F^T A`` to the reference's, and
    (from the second step on) the cosine between this step's gradient error and the previous step's."""

    vector_cosine: list[float]
    gradient_cosine: list[float]
    error_correlation: list[float]


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine between two tensors seen as flat vectors (0 when either is zero)."""
    norm = float(a.norm() * b.norm())
    return float((a.double() * b.double()).sum()) / norm if norm else 0.0


def step_fidelity(
    projector: Callable[[Tensor], Tensor],
    matrix: Tensor,
    steps: Sequence[tuple[Tensor, Tensor]],
    columns: slice = slice(None),
) -> StepFidelity:
    """Project each step's errors ``(N, d_e)`` with ``projector`` and with the exact ``matrix`` ``(d_e, d_fb)``, and
    compare the block gradients ``F[:, columns]^T A`` for the step's block inputs ``A`` ``(N, a)``.

    Steps are projected in order (a stateful projector such as the OPU draws new noise per call), so the error
    correlation is what training would see from one step to the next.
    """
    vectors, gradients, exact = [], [], []
    for error, inputs in steps:
        if error.shape[0] != inputs.shape[0]:
            raise ValueError(f"A step needs one input row per error row, got {error.shape[0]} and {inputs.shape[0]}.")
        feedback = projector(error)[:, columns].double()
        reference = (error.double() @ matrix.double())[:, columns]
        vectors.append(float(torch.nn.functional.cosine_similarity(feedback, reference, dim=1).mean()))
        gradients.append(feedback.T @ inputs.double())
        exact.append(reference.T @ inputs.double())
    cosines, correlations = gradient_fidelity(gradients, exact)
    return StepFidelity(vectors, cosines, correlations)


def gradient_fidelity(gradients: Sequence[Tensor], references: Sequence[Tensor]) -> tuple[list[float], list[float]]:
    """Per step, the cosine of a gradient to its reference; from the second step on, the cosine between this step's
    error ``gradient - reference`` and the previous step's (an error that repeats adds up over training)."""
    if len(gradients) != len(references):
        raise ValueError(f"One reference per step: got {len(gradients)} gradients and {len(references)} references.")
    errors = [g.double() - r.double() for g, r in zip(gradients, references)]
    cosines = [cosine(g, r) for g, r in zip(gradients, references)]
    return cosines, [cosine(now, before) for before, now in zip(errors, errors[1:])]
