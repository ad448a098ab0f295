"""Optimizer parameter groups with weight decay on matrices only (the recipes' models use them); the points'
learning rate is the DFA setting ``lr_scale`` (:mod:`lightning_dfa.feedback.update_scale`)."""

from __future__ import annotations

from typing import Any

from torch import nn


def param_groups(
    module: nn.Module, lr: float, weight_decay: float = 0.0, decay_vectors: bool = False
) -> list[dict[str, Any]]:
    """The trainable parameters in (at most) two groups: with ``weight_decay``, and without it for biases and norm
    weights (1-d) unless ``decay_vectors``."""
    groups: dict[float, list[nn.Parameter]] = {}
    for param in module.parameters():
        if param.requires_grad:
            groups.setdefault(weight_decay if decay_vectors or param.ndim >= 2 else 0.0, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": decay} for decay, params in groups.items()]
