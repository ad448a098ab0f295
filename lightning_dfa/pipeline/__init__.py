"""Layer-parallel DFA on ``torch.distributed.pipelining``: stages send activations forward and never gradients back.

The last stage computes the error ``e`` and broadcasts it; every stage projects its own columns of the shared
seeded feedback matrix and runs its local backward at once.
"""

from lightning_dfa.pipeline.chain import Chain, chain_of
from lightning_dfa.pipeline.groups import PipelineGroups, pipeline_groups, replicated_groups
from lightning_dfa.pipeline.projection import StageProjection
from lightning_dfa.pipeline.schedule import DFASchedule, StageFailure
from lightning_dfa.pipeline.split import StageModule, split_model

__all__ = [
    "Chain",
    "DFASchedule",
    "StageFailure",
    "PipelineGroups",
    "StageModule",
    "StageProjection",
    "chain_of",
    "pipeline_groups",
    "replicated_groups",
    "split_model",
]
