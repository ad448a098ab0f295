"""The projector seam: what every feedback projector is, whatever computes it.

A projector is an ``nn.Module`` mapping errors ``(N, in_features)`` to feedback ``(N, out_features)``, built
from ``(in_features, out_features, seed=...)`` and deterministic given its seed. Its ``state_dict`` carries the
seed and shapes (extra state), never a large matrix, so a resumed run can prove it rebuilt the same projection.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_dfa._checks import check_int


class Projector(nn.Module):
    """Base class of the projector kinds: subclasses implement :meth:`forward`; :meth:`settings` lists what defines one.

    Example::

        class Scaled(Projector):
            def forward(self, error):
                return error.repeat(1, self.out_features // self.in_features)
    """

    def __init__(self, in_features: int, out_features: int, *, seed: int = 0) -> None:
        super().__init__()
        where = f"{type(self).__name__}: "
        self.in_features = check_int("in_features", in_features, 1, where=where)
        self.out_features = check_int("out_features", out_features, 1, where=where)
        self.seed = check_int("seed", seed, 0, where=where)

    def settings(self) -> dict[str, Any]:
        """The arguments that define this projector (saved in checkpoints, checked on load)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "seed": self.seed}

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``(in_features, out_features)`` matrix ``M`` such that ``forward(e) == e @ M`` (linear projectors)."""
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        eye = torch.eye(self.in_features, dtype=dtype, device=device)
        return self(eye)

    def get_extra_state(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **self.settings()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        check_saved_state(state, self.get_extra_state())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings().items())


def check_saved_state(state: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise a clear error when a saved projector's kind, seed, shapes or settings differ from the current one."""
    if state != expected:
        diff = {
            k: (state.get(k), expected.get(k)) for k in set(state) | set(expected) if state.get(k) != expected.get(k)
        }
        raise ValueError(
            f"Saved projector does not match this one (saved, current): {diff}. "
            "Resume with the same projector settings the run was started with."
        )
