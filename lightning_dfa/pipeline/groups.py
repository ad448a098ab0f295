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
    """``p2p`` carries activations between neighbouring stages, ``error`` the error broadcast and agreements;
    with replicas, ``data`` joins this stage's copies in the other replicas (their gradients are averaged)."""

    ranks: tuple[int, ...]
    p2p: dist.ProcessGroup | None
    error: dist.ProcessGroup | None
    timeout: timedelta | None = None
    data: dist.ProcessGroup | None = None
    replicas: int = 1
    replica: int = 0


def pipeline_groups(ranks: Sequence[int] | None = None, timeout: timedelta | float = DEFAULT_TIMEOUT) -> PipelineGroups:
    """New groups over ``ranks`` (default: all), stage ``i`` on ``ranks[i]``; call it on every rank of the world.

    ``dist.new_group`` without ``timeout=`` takes the backend's 30-minute default, not the default group's: a
    stage that stopped answering would hang its peers that long. Both groups get ``timeout`` instead.
    """
    if not dist.is_initialized():
        raise RuntimeError("pipeline_groups needs torch.distributed initialized (init_process_group or Fabric).")
    ranks = tuple(range(dist.get_world_size())) if ranks is None else tuple(ranks)
    timeout = _timedelta(timeout)
    backend = dist.get_backend()
    p2p = dist.new_group(list(ranks), timeout=timeout, backend=backend)
    error = dist.new_group(list(ranks), timeout=timeout, backend=backend)
    return PipelineGroups(ranks, p2p, error, timeout)


def replicated_groups(stages: int, timeout: timedelta | float = DEFAULT_TIMEOUT) -> PipelineGroups:
    """Data parallel over pipelines: the world as ``world / stages`` replicas of a ``stages``-stage pipeline, replica
    ``r`` on ranks ``r * stages ... r * stages + stages - 1``; this rank's groups. Call it on every rank.

    Example::

        groups = replicated_groups(stages=2)             # 4 processes: 2 pipelines of 2 stages
        stage_index = dist.get_rank() % 2                # each replica reads its own share of the batch
    """
    if not dist.is_initialized():
        raise RuntimeError("replicated_groups needs torch.distributed initialized (init_process_group or Fabric).")
    world, rank, timeout = dist.get_world_size(), dist.get_rank(), _timedelta(timeout)
    if stages < 1 or world % stages:
        raise ValueError(f"{world} processes do not make replicas of {stages} stages: use a divisor of {world}.")
    backend, replicas = dist.get_backend(), world // stages
    mine = None
    for replica in range(replicas):  # every rank creates every group, in the same order
        ranks = list(range(replica * stages, (replica + 1) * stages))
        groups = [dist.new_group(ranks, timeout=timeout, backend=backend) for _ in range(2)]
        if rank in ranks:
            mine = (tuple(ranks), *groups)
    data = None
    for stage in range(stages):
        group = dist.new_group(list(range(stage, world, stages)), timeout=timeout, backend=backend)
        if rank % stages == stage:
            data = group
    return PipelineGroups(*mine, timeout, data if replicas > 1 else None, replicas, rank // stages)


def _timedelta(timeout: timedelta | float) -> timedelta:
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
