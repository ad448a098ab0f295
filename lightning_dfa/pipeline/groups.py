"""The pipeline's process groups, each with its own timeout: a silent or dead stage makes the others raise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

#: How long a stage waits for another before raising (activations, the error broadcast, the step's agreement).
DEFAULT_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class PipelineGroups:
    """``p2p`` carries activations between neighbouring stages, ``error`` the error broadcast and agreements."""

    ranks: tuple[int, ...]
    p2p: dist.ProcessGroup | None
    error: dist.ProcessGroup | None
    timeout: timedelta | None = None

    @property
    def member(self) -> bool:
        return dist.get_rank() in self.ranks


def pipeline_groups(ranks: Sequence[int] | None = None, timeout: timedelta | float = DEFAULT_TIMEOUT) -> PipelineGroups:
    """New groups over ``ranks`` (default: all), stage ``i`` on ``ranks[i]``; call it on every rank of the world.

    ``dist.new_group`` without ``timeout=`` takes the backend's 30-minute default, not the default group's: a
    stage that stopped answering would hang its peers that long. Both groups get ``timeout`` instead.
    """
    if not dist.is_initialized():
        raise RuntimeError("pipeline_groups needs torch.distributed initialized (init_process_group or Fabric).")
    ranks = tuple(range(dist.get_world_size())) if ranks is None else tuple(ranks)
    timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
    backend = dist.get_backend()
    p2p = dist.new_group(list(ranks), timeout=timeout, backend=backend)
    error = dist.new_group(list(ranks), timeout=timeout, backend=backend)
    return PipelineGroups(ranks, p2p, error, timeout)
