"""Turn a ``projector=`` argument (name, class, config, instance or matrix) into a projector."""

from __future__ import annotations

import inspect
import pydoc
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_dfa._checks import did_you_mean
from lightning_dfa.projectors.gaussian import Gaussian
from lightning_dfa.projectors.matrix import Matrix, check_matrix
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
    """Build the projector ``spec`` describes: a name, a class or factory, a class_path config, a module or a matrix.

    Example::

        >>> build_projector("seeded", 10, 300, seed=0).out_features
        300
    """
    spec = check_projector_spec(spec)
    if isinstance(spec, str | Mapping):
        config = {"class_path": spec} if isinstance(spec, str) else spec
        projector = _factory(config["class_path"])(in_features, out_features, seed=seed, **_settings(config))
    elif isinstance(spec, Tensor):
        projector = Matrix(spec)
    elif isinstance(spec, nn.Module):
        projector = spec
    else:
        projector = spec(in_features, out_features, seed=seed)
    check_projector_sizes(projector, in_features, out_features)
    return projector


def check_projector_spec(spec: ProjectorSpec) -> ProjectorSpec:
    """Validate a ``projector=`` argument before any model is seen (a typo fails when the ``DFA`` is built, not at
    the first forward pass); return it, a parsed config as a dict. Sizes are checked when it is built."""
    if hasattr(spec, "as_dict"):  # a jsonargparse Namespace: a class_path config from YAML or the CLI
        spec = spec.as_dict()
    if isinstance(spec, str):
        _factory(spec)
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or unknown:
            raise ValueError(
                f"A projector config needs 'class_path' and optional 'init_args', got keys {sorted(spec)}: write "
                "e.g. {'class_path': 'seeded', 'init_args': {'tile': 4096}} (in YAML: projector: {class_path: seeded})."
            )
        _check_settings(spec["class_path"], _factory(spec["class_path"]), _settings(spec))
    elif isinstance(spec, Tensor):
        check_matrix(spec)
    elif not isinstance(spec, nn.Module) and not callable(spec):
        raise TypeError(
            f"projector must be a name ({sorted(PROJECTORS)}), a config dict, a projector module, a matrix "
            f"or a factory; got {type(spec).__name__}."
        )
    return spec


def check_projector_sizes(projector: nn.Module, in_features: int, out_features: int) -> None:
    got = (getattr(projector, "in_features", None), getattr(projector, "out_features", None))
    if got != (in_features, out_features):
        raise ValueError(
            f"Projector {type(projector).__name__} maps {got[0]} -> {got[1]} features, but this model needs "
            f"{in_features} -> {out_features} (error size -> sum of the feedback points' sizes). "
            f"Give a projector (or matrix) of shape ({in_features}, {out_features}), or a name such as 'gaussian'."
        )


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    # Sizes and seed come from DFA; a parsed config may carry them as signature defaults.
    return {k: v for k, v in dict(config.get("init_args") or {}).items() if k not in _SET_BY_DFA}


def _check_settings(name: str, factory: Callable[..., nn.Module], settings: dict[str, Any]) -> None:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C factory: let it check its own arguments
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [
        n for n, p in parameters.items() if n not in _SET_BY_DFA and p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    for key in settings:
        if key not in accepted:
            hint = did_you_mean(key, accepted)
            raise ValueError(
                f"Projector {name!r} has no setting {key!r}.{hint} Its settings: {accepted} (in_features, "
                "out_features and seed are set by DFA)."
            )


def _factory(name: str) -> Callable[..., nn.Module]:
    """The factory of a registered name, or the class of a dotted path (imported by ``pydoc.locate``)."""
    factory = PROJECTORS.get(name) or ("." in name and pydoc.locate(name))
    if callable(factory):
        return factory
    if "." in name:
        raise ValueError(
            f"Cannot import projector class_path {name!r}: give a registered name ({sorted(PROJECTORS)}) or the "
            "full dotted path of an importable class, e.g. 'lightning_dfa.projectors.SeededGaussian'."
        )
    hint = did_you_mean(name, PROJECTORS)
    raise ValueError(
        f"Unknown projector {name!r}; known names: {sorted(PROJECTORS)}.{hint} Or give the dotted path of a "
        "projector class, or register_projector(name, factory) first."
    )
