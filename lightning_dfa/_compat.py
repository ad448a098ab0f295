"""Every private API of torch and transformers that the feedback engine relies on, each pinned by a test in
``tests/test_compat.py`` (Lightning's, W&B's and jsonargparse's are in :mod:`lightning_dfa._lightning_compat`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


# --------------------------------------------------------------------------------------------------------- torch
def current_graph_task_id() -> int:
    """The id of the backward pass that autograd runs in this thread; -1 outside one (torch's own modules use it)."""
    return torch._C._current_graph_task_id()


def queue_backward_callback(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the backward pass now running ends (torch's FSDP does it the same way)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


#: Attributes under which torch's FSDP (1) and activation-checkpoint wrappers keep the module they wrap.
WRAPPED_MODULE_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def forward_hooks(module: nn.Module) -> list[Callable[..., Any]]:
    """The forward hooks registered on ``module``: torch lists them nowhere public."""
    return list(module._forward_hooks.values())


# --------------------------------------------------------------------------------------------------- transformers
def hf_reentrant_checkpointing(module: nn.Module) -> bool:
    """Whether a HuggingFace layer with gradient checkpointing on checkpoints reentrantly (HF's default)."""
    options = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", {})
    return options.get("use_reentrant", True)
