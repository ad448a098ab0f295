"""Feedback projectors: modules mapping output errors ``(N, d_e)`` to feedback ``(N, sum d_i)``."""

from lightning_dfa.projectors.base import Projector
from lightning_dfa.projectors.camera import Camera
from lightning_dfa.projectors.cost import (
    ElectronicCost,
    OpticalCost,
    electronic_cost,
    equivalent_teraops,
    frames_per_vector,
    optical_cost,
)
from lightning_dfa.projectors.encoding import Frames, encode
from lightning_dfa.projectors.gaussian import Gaussian, default_std
from lightning_dfa.projectors.matrix import Matrix
from lightning_dfa.projectors.opu import OPU
from lightning_dfa.projectors.registry import PROJECTORS, build_projector, register_projector
from lightning_dfa.projectors.seeded import SeededGaussian
from lightning_dfa.projectors.structured import Structured

__all__ = [
    "OPU",
    "PROJECTORS",
    "Camera",
    "ElectronicCost",
    "Frames",
    "Gaussian",
    "Matrix",
    "OpticalCost",
    "Projector",
    "SeededGaussian",
    "Structured",
    "build_projector",
    "default_std",
    "electronic_cost",
    "encode",
    "equivalent_teraops",
    "frames_per_vector",
    "optical_cost",
    "register_projector",
]
