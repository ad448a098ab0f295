"""The global random states (torch, CUDA, numpy, Python): saved with a checkpoint, replayed, or isolated."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def random_states() -> dict[str, Any]:
    """The global random states, readable by ``torch.load(weights_only=True)``."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`random_states` returned (CUDA states only onto the same number of devices)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, state, python_gauss = states["python"]
    random.setstate((version, tuple(state), python_gauss))


@contextmanager
def isolated(states: dict[str, Any] | None = None, seed: int | None = None) -> Iterator[None]:
    """Run from ``states`` (or from ``seed``); afterwards every global random state is what it was before."""
    before = random_states()
    try:
        if states is not None:
            set_random_states(states)
        if seed is not None:
            torch.manual_seed(seed)
        yield
    finally:
        set_random_states(before)
