"""Hooks that belong to one engine, and finding the engine attached to a model.

A deep copy of the model (an EMA or SWA copy) copies its hooks too; the copy is not attached, so each copied
hook becomes a no-op instead of writing into the engine's records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_dfa import _compat


class EngineHook:
    """``function`` as a module hook of ``engine`` (None: a hook of no engine's state, such as a check)."""

    def __init__(self, function: Callable[..., Any], engine: Any = None) -> None:
        self.function, self.engine = function, engine

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _no_op


def _no_op(*args: Any) -> None:
    return None


def attached_engine(model: nn.Module) -> Any | None:
    """The engine whose hooks are on ``model``, if any."""
    for module in model.modules():
        for hook in _compat.forward_hooks(module):
            if isinstance(hook, EngineHook) and hook.engine is not None:
                return hook.engine
    return None
