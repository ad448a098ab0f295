"""A plain MLP classifier: the quick start's model, and the reference for DFA on MLPs."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_dfa.models.base import Classification, DFAModule

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class MLPClassifier(DFAModule, Classification):
    """``depth`` blocks of Linear + activation (the feedback points), then a linear head (the error point).

    Example::

        Trainer(strategy="dfa", max_epochs=30).fit(MLPClassifier(), datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: int = 256,
        depth: int = 3,
        num_classes: int = 10,
        activation: str = "tanh",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dfa: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        self.save_hyperparameters()
        widths = [in_features] + [hidden] * depth
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), ACTIVATIONS[activation]()) for a, b in zip(widths, widths[1:])
        )
        self.head = nn.Linear(widths[-1], num_classes)

    optimizer = torch.optim.Adam

    def dfa_defaults(self) -> dict[str, Any]:
        return {"blocks": "blocks.*", "output": "head"}

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)
