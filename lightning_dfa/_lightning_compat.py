"""Every private API of Lightning, W&B and jsonargparse that the Lightning layer relies on, each pinned by a test in
``tests/test_compat.py`` (torch's and transformers' are in :mod:`lightning_dfa._compat`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


# ------------------------------------------------------------------------------------------------------ Lightning
def attached_trainer(module: nn.Module) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def sampler_ranks(trainer: Any) -> dict[str, int]:
    """``num_replicas`` and ``rank`` as Lightning's distributed sampler would get them: one share (1, 0) in a single
    process or with ``Trainer(use_distributed_sampler=False)``, which the Trainer keeps only in its connector."""
    if not getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True):
        return {"num_replicas": 1, "rank": 0}
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}


def launcher_spawns(trainer: Any) -> bool:
    """Whether ``fit`` starts its processes by spawning (objects made before are then pickled to them)."""
    return getattr(getattr(trainer.strategy, "launcher", None), "_start_method", None) in ("spawn", "forkserver")


def subcommand_parsers(cli: Any) -> dict[str, Any]:
    """A ``LightningCLI``'s parser of each subcommand (``{"fit": parser, ...}``; empty before they are made)."""
    return getattr(cli, "_subcommand_parsers", {})


@contextmanager
def logging_muted(module: Any) -> Iterator[None]:
    """Within it, ``module.log`` and ``module.log_dict`` do nothing (Lightning has no switch for that)."""
    module.log, module.log_dict = (lambda *args, **kwargs: None), (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        del module.log, module.log_dict


def wrap_methods(obj: Any, names: Iterable[str], wrap: Callable[[str, Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace each method ``name`` of this one object (not its class) by ``wrap(name, method)``: Lightning's
    loggers have no hook for a failing call, so :mod:`lightning_dfa.loggers` guards them this way."""
    for name in names:
        method = getattr(obj, name, None)
        if callable(method):
            setattr(obj, name, wrap(name, method))


# ---------------------------------------------------------------------------------------------------------- wandb
def wandb_started(logger: Any) -> bool:
    """Whether a Lightning ``WandbLogger`` has started its W&B run (``logger.experiment`` would start one)."""
    return getattr(logger, "_experiment", None) is not None


def drop_unset_anonymous(logger: Any) -> None:
    """Leave ``anonymous`` out of a Lightning ``WandbLogger``'s ``wandb.init`` arguments when it is None: Lightning
    always passes it, and wandb 0.23+ warns "The anonymous setting has no effect" whenever it is given."""
    if logger._wandb_init.get("anonymous", "unset") is None:
        del logger._wandb_init["anonymous"]


# ---------------------------------------------------------------------------------------------- argparse, jsonargparse
def parser_dests(parser: Any) -> list[str]:
    """The destinations (``"trainer.max_steps"``, ...) of every option of an argparse / jsonargparse parser."""
    return [action.dest for action in getattr(parser, "_actions", []) if isinstance(action.dest, str)]


def unknown_option(message: str) -> tuple[str | None, str] | None:
    """The unknown option a jsonargparse error names (as text alone): ``(class_path, key)`` when a class's
    ``init_args`` reject ``key``, ``(None, "group.key")`` for a parser group, None for any other error."""
    if found := re.search(r"class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted", message):
        return found[1], found[2]
    if found := re.search(r"(?:Group '([\w.]+)' )?does not accept option '([\w.]+)'", message):
        return None, f"{found[1]}.{found[2]}" if found[1] else found[2]
    if found := re.search(r"Option '([\w.]+)' is not accepted", message):
        return None, found[1]
    return None
