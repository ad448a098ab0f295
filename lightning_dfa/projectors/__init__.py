"""Feedback projectors: modules mapping output errors ``(N, d_e)`` to feedback ``(N, sum d_i)``."""

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.gaussian import Gaussian, default_std
from lightning_dfa.projectors.matrix import Matrix
from lightning_dfa.projectors.registry import PROJECTORS, build_projector, register_projector

__all__ = ["PROJECTORS", "Gaussian", "Matrix", "Projector", "build_projector", "default_std", "register_projector"]
