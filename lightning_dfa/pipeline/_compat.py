"""Every private or unstable use of ``torch.distributed.pipelining`` (documented as alpha), each pinned by a test in
``tests/test_pipeline_compat.py``. The DFA schedule reaches torch's stage through these only.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.pipelining import schedules as _schedules
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

#: The method a single-stage schedule implements; ``PipelineScheduleSingle.step`` splits the batch and calls it.
STEP_MICROBATCHES = "_step_microbatches"


def batch_p2p(ops: list[dist.P2POp], desc: str) -> dict[int, list[dist.Work]]:
    """Issue point-to-point ops grouped by peer, as torch's own schedules do (``_sorted_batch_p2p``)."""
    return _schedules._sorted_batch_p2p(ops, desc=desc)


def wait_p2p(works: dict[int, list[dist.Work]]) -> None:
    for work in works.values():
        _schedules._wait_batch_p2p(work)


def check_microbatches(
    schedule: PipelineScheduleSingle, arg_mbs: Any, kwarg_mbs: Any, target_mbs: Any, losses: Any
) -> tuple[list, list]:
    """The schedule's own check of the microbatch lists (lengths, types); empty args for the later stages."""
    return schedule._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)


def initialize_stage(schedule: PipelineScheduleSingle, args: Any, kwargs: Any) -> None:
    """Warm up the stage's point-to-point links and infer the activation shapes (first step only)."""
    schedule._initialize_stage(args, kwargs, None)


def stage_of(schedule: PipelineScheduleSingle) -> Any:
    return schedule._stage


def microbatch_count(schedule: PipelineScheduleSingle) -> int:
    return schedule._n_microbatches


def release_forward(stage: Any, index: int) -> None:
    """Drop a microbatch's cached stage output (torch's backward would pop it; with ``loss_fn=None`` nothing does)."""
    stage.fwd_cache.pop(index, None)
