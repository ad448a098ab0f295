"""``DFAConfig``: every DFA setting, validated once; whatever takes DFA settings takes these and nothing else.

Example::

    config = DFAConfig(blocks="blocks.*", output="head", backprop_top=1)
    config.replace(mode="backprop")                       # a new, validated config
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_dfa._checks import check_int, closest
from lightning_dfa.feedback.update_scale import (
    DEFAULT_HEAD_LR_SCALE,
    DEFAULT_LR_SCALE,
    DEFAULT_LR_SCALE_RAMP,
    check_head_lr_scale,
    check_lr_scale,
    check_lr_scale_ramp,
)

MODES = ("dfa", "backprop", "frozen")
EMBEDDINGS = (False, True, "first_block")
#: What a training step with a NaN or infinite loss, error or gradient does (Lightning runs; see ``DFA``).
NONFINITE = ("stop", "skip")


@dataclass(frozen=True)
class DFAConfig:
    """The DFA settings, one line each.

    Args:
        blocks: module paths or glob patterns (``"transformer.h.*"``), or ``"auto"``.
        output: module whose output's gradient is the error ``e``; ``None``: chosen automatically.
        projector: ``"gaussian"``, a projector module, a ``(d_e, sum d_i)`` matrix, a class, or a class_path config.
        seed: seed of the projection, the same on every device and rank.
        mode: ``"dfa"``, ``"backprop"`` (true gradients) or ``"frozen"`` (points frozen: the control).
        error_rows: leading dimensions of the error that are rows (default: 2 for ``(B, T, V)``, else 1).
        head_lr_scale: in ``"dfa"`` and ``"frozen"`` modes, what trains by true gradient (head, embeddings) learns
            at ``head_lr_scale`` x the optimizer's rate (default 3; 1: the optimizer's own).
        lr_scale: the points learn at ``lr_scale`` x the optimizer's rate; ``"auto"``:
            ``min(0.1, head_lr_scale / sqrt(d_e))``.
        lr_scale_ramp: optimizer steps over which an ``"auto"`` share rises linearly from 0 (0: none).
        backprop_top: the top ``k`` blocks train with their true gradient.
        embeddings: ``True``: embeddings are points; ``"first_block"``: they learn from block 0's feedback.
        spatial_feedback, spatial_patch: image errors give one row per pixel (patch), pooled per point.
        nonfinite, nonfinite_patience: at a NaN/inf, ``"stop"`` the run or ``"skip"`` the step (patience: in a row).
        strict: a trainable parameter that the points leave without a gradient is an error, not a warning.
    """

    blocks: str | Sequence[str] = "auto"
    output: str | None = None
    projector: Any = "gaussian"  # a ProjectorSpec (lightning_dfa.projectors.registry)
    seed: int = 0
    mode: str = "dfa"
    error_rows: int | None = None
    head_lr_scale: float = DEFAULT_HEAD_LR_SCALE
    lr_scale: float | str = DEFAULT_LR_SCALE
    lr_scale_ramp: int = DEFAULT_LR_SCALE_RAMP
    backprop_top: int = 0
    embeddings: bool | str = False
    spatial_feedback: bool = False
    spatial_patch: int = 1
    nonfinite: str = "stop"
    nonfinite_patience: int = 10
    strict: bool = False

    def __post_init__(self) -> None:
        nonfinite = ": 'stop' ends the run at the first NaN or inf, 'skip' skips such steps"
        for setting, allowed, why in (
            ("mode", MODES, ""),
            ("embeddings", EMBEDDINGS, ""),
            ("nonfinite", NONFINITE, nonfinite),
        ):
            if getattr(self, setting) not in allowed:
                raise ValueError(f"{setting} must be one of {allowed}, got {getattr(self, setting)!r}{why}.")
        check_int("backprop_top", self.backprop_top, 0)
        check_int("seed", self.seed, 0)
        check_int("nonfinite_patience", self.nonfinite_patience, 1)
        if not isinstance(self.spatial_patch, int) or self.spatial_patch < 1 or self.spatial_patch % 2 == 0:
            raise ValueError(
                f"spatial_patch must be an odd positive integer (1, 3, 5, ...), got {self.spatial_patch!r}."
            )
        check_head_lr_scale(self.head_lr_scale)
        check_lr_scale(self.lr_scale)
        check_lr_scale_ramp(self.lr_scale_ramp)
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be True or False, got {self.strict!r}.")

    @classmethod
    def names(cls) -> list[str]:
        """The settings' names."""
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def of(cls, spec: DFAConfig | Mapping[str, Any] | None, where: str = "DFA") -> DFAConfig:
        """A config from a config, a mapping of settings (``configure_dfa()``, ``dfa=``) or ``None`` (defaults);
        an unknown setting is named with the closest valid ones."""
        if spec is None or isinstance(spec, DFAConfig):
            return spec or cls()
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"{where} must be a DFAConfig or a dict of DFA settings, got {type(spec).__name__}: e.g. "
                "{'blocks': 'blocks.*', 'output': 'head'}."
            )
        check_names(spec, where)
        return cls(**spec)

    def replace(self, **changes: Any) -> DFAConfig:
        """This config with ``changes`` (checked like the constructor's arguments)."""
        check_names(changes, "DFAConfig.replace()")
        return dataclasses.replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The settings as a dict (shallow: a projector module stays the same object)."""
        return {name: getattr(self, name) for name in self.names()}


def check_names(settings: Mapping[str, Any], where: str) -> None:
    """Raise ``TypeError`` naming the unknown keys of ``settings`` and the closest valid DFA settings."""
    valid = DFAConfig.names()
    unknown = [key for key in settings if key not in valid]
    if not unknown:
        return
    close = {key: closest(key, valid) for key in unknown}
    hints = ", ".join(f"{key!r} -> {match[0]!r}" for key, match in close.items() if match)
    raise TypeError(
        f"{where} got unknown DFA settings {unknown}"
        + (f" (did you mean {hints}?)" if hints else "")
        + f"; valid settings: {sorted(valid)}."
    )
