"""Under DFA the feedback points learn at ``lr_scale`` x the learning rate of whatever optimizer trains them, and
everything trained by its true gradient (the head, the embeddings, norms outside the blocks) at ``head_lr_scale`` x
it: step hooks set the groups' ``lr`` for the step only (the points in groups of their own): the optimizer then
sees exactly the groups a user would write, so it is exact for any optimizer and scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_dfa.feedback.rows import error_row_dims

#: The default: ``"auto"``, ``head_lr_scale`` over the square root of the error's width (:func:`auto_lr_scale`).
DEFAULT_LR_SCALE = "auto"

#: The largest share ``"auto"`` gives (narrow errors: ten classes, a small image), of the optimizer's rate.
AUTO_LR_SCALE_CAP = 0.1

#: The default ``lr_scale_ramp``: 0, the full share from the first step (see ``check_lr_scale_ramp``).
DEFAULT_LR_SCALE_RAMP = 0

#: The default ``head_lr_scale``: what DFA trains by true gradient is a shallow network (the head on features, the
#: embeddings), and it learns best at a higher rate than the deep network backprop trains (docs/learning.md).
DEFAULT_HEAD_LR_SCALE = 3.0

#: The largest ``head_lr_scale`` accepted (a larger one is a typo or a learning rate set in the wrong place).
MAX_HEAD_LR_SCALE = 100.0

#: Key of the optimizer steps taken (where ``lr_scale_ramp`` stands) in the feedback state of a checkpoint.
UPDATE_STEPS = "lr_scale_steps"

#: Key of the scaled copies in the optimizer's groups while a step runs (to tell them apart).
SCALED = "lightning_dfa_lr_scale"


class ScaledUpdates:
    """Scale the update of ``params`` to ``scale`` x what ``optimizer`` gives their group, and (``rest``) every other
    parameter's to ``rest`` x its group's rate.

    Example::

        scaled = ScaledUpdates(optimizer, model.blocks.parameters(), scale=0.03, rest=3.0)
        optimizer.step()      # the blocks: a step at 0.03 x lr; everything else: at 3 x lr
        scaled.remove()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[nn.Parameter],
        scale: Any,
        ramp: int = 0,
        rest: float = 1.0,
    ) -> None:
        if not callable(scale):
            check_lr_scale(scale)
        check_lr_scale_ramp(ramp)
        check_head_lr_scale(rest)
        #: The rate of every other parameter relative to its group's (``head_lr_scale``).
        self.rest = rest
        #: ``ramp > 0``: step ``k`` (from 0) scales by ``scale * min(1, k / ramp)``: the points start still.
        self.ramp = ramp
        #: Optimizer steps taken under these hooks (a resumed run sets it to its own count).
        self.steps = 0
        # A number, or a function read at every step: ``"auto"`` is known once the first error has been seen, which in a
        # Lightning step (forward and backward inside ``step(closure)``) is after the pre-hook: see rescale().
        self.scale = scale
        self.optimizer = optimizer
        self._params = set(params)
        self._groups: list[tuple[dict[str, Any], list[nn.Parameter], Any]] = []  # group, its params, its lr
        self._scaled: list[dict[str, Any]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._split),
            optimizer.register_step_post_hook(self._stepped),
        ]

    def _split(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._merge()  # a step that raised left its groups split
        for group in list(optimizer.param_groups):
            points = [p for p in group["params"] if p in self._params]
            if not points and self.rest == 1.0:
                continue
            self._groups.append((group, group["params"], group["lr"]))
            # The user's group keeps its place (code that reads param_groups[i] during the step sees it).
            group["params"] = [p for p in group["params"] if p not in self._params]
            self._scaled.append({**group, "params": points, SCALED: True})
        optimizer.param_groups.extend(scaled for scaled in self._scaled if scaled["params"])
        self.rescale()

    def rescale(self) -> None:
        """Set the groups' rates from the scale now known (called again when ``"auto"`` is resolved)."""
        scale = self.scale() if callable(self.scale) else self.scale
        share = (1.0 if scale is None else scale) * ramp_factor(self.steps, self.ramp)
        for (group, _, lr), scaled in zip(self._groups, self._scaled):
            if self.rest != 1.0:
                group["lr"] = lr * self.rest
            scaled["lr"] = lr * share

    def _stepped(self, *_: Any) -> None:
        self.steps += 1
        self._merge()

    def _merge(self, *_: Any) -> None:
        if not self._groups:
            return
        self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if not g.get(SCALED)]
        for group, params, lr in self._groups:
            group["params"], group["lr"] = params, lr  # the user's own lr object (a scheduler's, a tensor) back
        self._groups.clear()
        self._scaled.clear()

    def remove(self) -> None:
        """Take the hooks off: the optimizer steps as it did before."""
        self._merge()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check_lr_scale(scale: Any) -> None:
    """``lr_scale`` is ``"auto"`` or a number in [0, 1] (0 freezes the points; 1 is the optimizer's own rate)."""
    if scale == "auto":
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
        raise ValueError(
            f"lr_scale must be 'auto' or a number in [0, 1], the feedback points' share of the learning rate (1.0 "
            f"leaves the optimizer as it is), got {scale!r}."
        )


def check_head_lr_scale(scale: Any) -> None:
    """``head_lr_scale`` is a number in (0, 100]: the rate of what DFA trains by true gradient, x the optimizer's."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= MAX_HEAD_LR_SCALE:
        raise ValueError(
            f"head_lr_scale must be a number in (0, {MAX_HEAD_LR_SCALE:g}], the learning rate of what DFA and its "
            f"frozen control train by true gradient (head, embeddings) as a multiple of the optimizer's "
            f"({DEFAULT_HEAD_LR_SCALE:g} by default, 1.0 leaves it as it is), got {scale!r}."
        )


def steps_taken(scaled: Sequence[ScaledUpdates], resumed: int) -> int:
    """Optimizer steps taken under ``scaled`` (where ``lr_scale_ramp`` stands), or a checkpoint's ``resumed`` count
    while no optimizer is scaled yet."""
    return max((each.steps for each in scaled), default=resumed)


def update_rates(config: Any, auto: Callable[[], float | None]) -> tuple[Any, int, float] | None:
    """The ``scale``, ``ramp`` and ``rest`` of :class:`ScaledUpdates` for a ``DFAConfig``, or ``None`` where nothing
    changes (backprop; every rate at the optimizer's own). ``"auto"`` is read from ``auto()`` at every step and
    ramped over ``lr_scale_ramp`` steps; a number is used as given, from the first step. The frozen control's points
    do not learn: only its ``head_lr_scale`` applies."""
    head = config.head_lr_scale
    if config.mode == "backprop" or (head == 1.0 and (config.mode == "frozen" or config.lr_scale == 1.0)):
        return None
    if config.mode == "frozen":
        return 1.0, 0, head
    if config.lr_scale == "auto":
        return auto, config.lr_scale_ramp, head
    return config.lr_scale, 0, head


def ramp_factor(step: int, ramp: int) -> float:
    """``min(1, step / ramp)`` (1 when ``ramp`` is 0): the share of ``lr_scale`` that step ``step`` (from 0) takes.

    Example::

        ramp_factor(0, 150), ramp_factor(75, 150), ramp_factor(400, 150)   # 0.0, 0.5, 1.0
    """
    return 1.0 if ramp == 0 else min(1.0, step / ramp)


def check_lr_scale_ramp(ramp: Any) -> None:
    """``lr_scale_ramp`` is a whole number of optimizer steps, 0 or more (0: the full share from the first step)."""
    if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
        raise ValueError(
            f"lr_scale_ramp must be a whole number of optimizer steps >= 0 over which lr_scale='auto' rises from 0 "
            f"(0: no ramp), got {ramp!r}."
        )


def auto_lr_scale(error_shape: Sequence[int], head_lr_scale: float = DEFAULT_HEAD_LR_SCALE) -> float:
    """``min(0.1, head_lr_scale / sqrt(width))``, ``width`` the error's values per row with the default rows: the
    points at one over the square root of the width of the head's rate, and never above a tenth of the optimizer's.

    Example::

        auto_lr_scale((8, 128, 4096))        # 0.046875 = 3 / 64: a GPT's logits, per token
        auto_lr_scale((8, 128, 4096), 1.0)   # 0.015625 with the head at the optimizer's own rate
    """
    width = math.prod(error_shape[error_row_dims(torch.Size(error_shape), None) :])
    return min(AUTO_LR_SCALE_CAP, head_lr_scale / math.sqrt(width))
