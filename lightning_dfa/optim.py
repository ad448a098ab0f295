"""Per-module learning-rate multipliers as ordinary optimizer parameter groups.

DFA blocks, the head and the embeddings often want different step sizes; this builds the groups
any ``torch.optim`` optimizer takes (and every LR scheduler scales group by group).

Example::

    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_multipliers={"model.transformer.h.*": 0.3})
    optimizer = torch.optim.AdamW(groups)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_dfa.feedback.points import _matches, _no_match_message


def param_groups(
    module: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    lr_multipliers: Mapping[str, float] | None = None,
    decay_vectors: bool = False,
) -> list[dict[str, Any]]:
    """Groups of trainable parameters by learning-rate multiplier and weight decay.

    ``lr_multipliers`` maps module paths or glob patterns (as for DFA ``blocks``) to a factor on ``lr``;
    a parameter takes the factor of the first pattern matching its module or one of its parents, else 1.
    Biases and norm weights (1-d) get no weight decay unless ``decay_vectors``.
    """
    multipliers = dict(lr_multipliers or {})
    _check_patterns(module, multipliers)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        factor = _multiplier(name, multipliers)
        decay = weight_decay if decay_vectors or param.ndim >= 2 else 0.0
        groups.setdefault((factor, decay), []).append(param)
    return [{"params": ps, "lr": lr * factor, "weight_decay": decay} for (factor, decay), ps in groups.items()]


def _multiplier(name: str, multipliers: dict[str, float]) -> float:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    for pattern, factor in multipliers.items():
        if any(_matches(prefix, pattern) for prefix in prefixes):
            return float(factor)
    return 1.0


def _check_patterns(module: nn.Module, multipliers: dict[str, float]) -> None:
    names = [name for name, _ in module.named_modules() if name]
    for pattern, factor in multipliers.items():
        if not isinstance(factor, (int, float)) or factor < 0:
            raise ValueError(f"lr_multipliers[{pattern!r}] must be a non-negative number, got {factor!r}.")
        if not any(_matches(name, pattern) for name in names):
            raise ValueError(_no_match_message(pattern, names, module, role="lr_multipliers"))


def dfa_lr_multipliers(module: Any) -> Mapping[str, float] | None:
    """A LightningModule's ``lr_multipliers`` if its run trains with DFA (``mode="dfa"``), else ``None``.

    The multipliers are DFA settings: backprop and frozen-control runs of the same recipe use ``lr``
    everywhere, so ``--baselines`` compares DFA with backprop at backprop's own learning rate.
    """
    from lightning_dfa.callback import find_dfa

    multipliers = module.hparams.get("lr_multipliers")
    trainer = getattr(module, "_trainer", None)
    engine = find_dfa(trainer) if trainer is not None else None
    return multipliers if engine is not None and engine.mode == "dfa" else None
