"""Turn a ``projector=`` argument (name, class, config, instance or matrix) into a projector."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_dfa.projectors.gaussian import Gaussian
from lightning_dfa.projectors.matrix import Matrix
from lightning_dfa.projectors.opu import OPU
from lightning_dfa.projectors.seeded import SeededGaussian
from lightning_dfa.projectors.structured import Structured

#: Projector kinds by the name accepted in ``DFA(projector=...)`` and in YAML configs.
PROJECTORS: dict[str, Callable[..., nn.Module]] = {
    "gaussian": Gaussian,
    "seeded": SeededGaussian,
    "structured": Structured,
    "opu": OPU,
}

_SET_BY_DFA = ("in_features", "out_features", "seed")

ProjectorSpec = str | Mapping[str, Any] | nn.Module | Tensor | Callable[..., nn.Module]


def register_projector(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory(in_features, out_features, seed=..., **settings)`` available by ``name``."""
    PROJECTORS[name] = factory


def build_projector(spec: ProjectorSpec, in_features: int, out_features: int, seed: int) -> nn.Module:
    """Build the projector that ``spec`` describes for errors of size ``in_features``.

    ``spec`` may be a registered name (``"gaussian"``), a class or factory, a LightningCLI-style
    config ``{"class_path": ..., "init_args": {...}}`` (``class_path`` may also be a registered
    name), a ready projector module, or a ``(in_features, out_features)`` matrix.
    """
    if hasattr(spec, "as_dict"):  # a jsonargparse Namespace: a class_path config from YAML or the CLI
        spec = spec.as_dict()
    if isinstance(spec, str):
        projector = _factory(spec)(in_features, out_features, seed=seed)
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or unknown:
            raise ValueError(
                f"A projector config needs 'class_path' and optional 'init_args', got keys {sorted(spec)}."
            )
        # Sizes and seed come from DFA; a parsed config may carry them as signature defaults.
        settings = {k: v for k, v in dict(spec.get("init_args") or {}).items() if k not in _SET_BY_DFA}
        projector = _factory(spec["class_path"])(in_features, out_features, seed=seed, **settings)
    elif isinstance(spec, Tensor):
        projector = Matrix(spec)
    elif isinstance(spec, nn.Module):
        projector = spec
    elif callable(spec):
        projector = spec(in_features, out_features, seed=seed)
    else:
        raise TypeError(
            f"projector must be a name ({sorted(PROJECTORS)}), a config dict, a projector module, a matrix "
            f"or a factory; got {type(spec).__name__}."
        )
    check_projector_sizes(projector, in_features, out_features)
    return projector


def check_projector_sizes(projector: nn.Module, in_features: int, out_features: int) -> None:
    got = (getattr(projector, "in_features", None), getattr(projector, "out_features", None))
    if got != (in_features, out_features):
        raise ValueError(
            f"Projector {type(projector).__name__} maps {got[0]} -> {got[1]} features, but this model needs "
            f"{in_features} -> {out_features} (error size -> sum of the feedback points' sizes). "
            f"Give a projector (or matrix) of shape ({in_features}, {out_features}), or a name such as 'gaussian'."
        )


def _factory(name: str) -> Callable[..., nn.Module]:
    if name in PROJECTORS:
        return PROJECTORS[name]
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"Cannot import projector class_path {name!r}: {err}") from err
    raise ValueError(f"Unknown projector {name!r}; known names: {sorted(PROJECTORS)} (or a dotted class path).")
