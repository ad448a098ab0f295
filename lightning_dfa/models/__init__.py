"""LightningModules used by the recipes."""

from lightning_dfa.models.mlp import MLPClassifier

__all__ = ["MLPClassifier"]
