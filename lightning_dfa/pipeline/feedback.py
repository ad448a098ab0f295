"""A stage's DFA: its points' layout in the whole model's, its projection columns, and its local backward."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.feedback.projection import (
    check_layout_features,
    check_saved_layout,
    check_saved_settings,
    feedback_state,
    layout_of,
)
from lightning_dfa.feedback.rows import PointShape, error_row_dims
from lightning_dfa.feedback.update_scale import (
    UPDATE_STEPS,
    ScaledUpdates,
    auto_lr_scale,
    steps_taken,
    update_rates,
)
from lightning_dfa.pipeline.projection import StageProjection
from lightning_dfa.projectors import build_projector


class StageFeedback:
    """The feedback of one stage's points: ``B[:, columns] e``, reshaped to each point's output, then its backward.

    The layout is the one-process engine's (points in model order, each a column slice), agreed between the stages
    at the first error (one ``all_gather_object`` of the points' sizes); each stage then builds only its columns.
    """

    def __init__(self, config: DFAConfig, points: list[str], group: dist.ProcessGroup | None) -> None:
        self.config, self.points, self.group = config, points, group
        self.layout: dict[str, slice] = {}
        self.error_features: int | None = None
        self.projection: StageProjection | None = None
        self.projector_state: dict[str, Any] | None = None  # the whole projector's state, as the engine saves it
        self.points_lr_scale: float | None = None if config.lr_scale == "auto" else float(config.lr_scale)
        self._scaled: list[ScaledUpdates] = []
        self._resumed_steps = 0  # a checkpoint's optimizer steps (where lr_scale_ramp stands), until scale_updates()
        self._saved: dict[str, Any] | None = None

    def shapes(self, records: list[tuple[str, Tensor]], error_shape: torch.Size) -> dict[str, PointShape]:
        rows = error_row_dims(error_shape, self.config.error_rows)
        return {name: PointShape.of(name, hidden.shape, error_shape, rows) for name, hidden in records}

    def build(self, shapes: dict[str, PointShape], error_shape: torch.Size, device: torch.device) -> None:
        """Agree on the layout with the other stages (a collective: every stage calls it at its first error)."""
        rows = error_row_dims(error_shape, self.config.error_rows)
        error_features = math.prod(error_shape[rows:])
        mine = [(name, shapes[name].features) for name in self.points]
        gathered: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(gathered, mine, group=self.group)
        layout, start = layout_of(item for stage in gathered for item in stage)
        if self._saved is not None:
            check_saved_layout(self._saved, layout, error_features)
        full = build_projector(self.config.projector, error_features, start, self.config.seed)
        columns = slice(layout[self.points[0]].start, layout[self.points[-1]].stop) if self.points else slice(0, 0)
        self.projection = StageProjection(full, columns).to(device)
        self.projector_state = full.state_dict()
        if self._saved is not None:
            full.load_state_dict(self._saved["projector"])  # checks kind, seed and settings
            self._saved = None
        self.layout, self.error_features = layout, error_features
        if self.config.lr_scale == "auto":
            self.points_lr_scale = auto_lr_scale(error_shape, self.config.head_lr_scale)
            for scaled in self._scaled:
                scaled.rescale()

    def apply(self, error: Tensor, records: list[tuple[str, Tensor]]) -> None:
        """Backward of this stage's blocks from ``error`` (finite: the schedule checks it first)."""
        if not records:
            return
        shapes = self.shapes(records, error.shape)
        if self.projection is None:
            raise RuntimeError("StageFeedback.apply before build: the layout is agreed at the first error.")
        check_layout_features(shapes, self.layout)
        records = [(name, hidden) for name, hidden in records if hidden.requires_grad]  # a frozen block: no backward
        if not records:
            return
        feedback = self.projection(error.reshape(-1, self.error_features).float())
        offset = self.projection.columns.start
        grads = [
            shapes[name]
            .gradient(feedback[:, self.layout[name].start - offset : self.layout[name].stop - offset])
            .to(error.dtype)
            for name, _ in records
        ]
        torch.autograd.backward([hidden for _, hidden in records], grads)

    def scale_updates(self, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
        """The stage's points learn at ``lr_scale`` x the optimizer's rate and the rest at ``head_lr_scale`` x it, as
        in one process."""
        rates = update_rates(self.config, lambda: self.points_lr_scale)
        if rates is None:
            return
        params = [p for name in self.points for p in module.get_submodule(name).parameters() if p.requires_grad]
        self._scaled.append(ScaledUpdates(optimizer, params, *rates))
        self._scaled[-1].steps, self._resumed_steps = self._resumed_steps, 0

    def state_dict(self) -> dict[str, Any]:
        """What the one-process engine saves (seed, layout, projector, lr_scale): loadable into the unsplit engine."""
        steps = {UPDATE_STEPS: steps_taken(self._scaled, self._resumed_steps)}
        if self.projection is None:
            return {**(dict(self._saved) if self._saved else {"seed": self.config.seed}), **steps}
        return {**feedback_state(self.config, self.error_features, self.layout, self.projector_state), **steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_saved_settings(state, self.config)
        self._resumed_steps = int(state.get(UPDATE_STEPS, 0))
        for scaled in self._scaled:
            scaled.steps = self._resumed_steps
        if "layout" in state:
            self._saved = dict(state)  # checked against the layout agreed at the next first error
