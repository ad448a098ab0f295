"""The path of ``B e``: in backward, the error at the output point becomes every block's gradient.

:class:`FeedbackRouter` is the identity on the output point's output. In backward it passes the error ``e`` on to
the head unchanged, and asks the :class:`Projection` for the blocks' gradients: the error is cut into rows, checked
for NaN and inf, projected once (``f = projector(e)``, one row per error row), and each point's columns of ``f``
(its slice of the layout) are shaped into the gradient of that point's output.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.feedback.guard import RoutingGuard
from lightning_dfa.feedback.rows import PointShape, SpatialShape, error_row_dims, spatial_error_rows
from lightning_dfa.projectors import build_projector
from lightning_dfa.projectors.checks import check_fits_in_memory, nonfinite_rows
from lightning_dfa.projectors.registry import check_projector_sizes

#: ``observe(error_rows, {point: feedback_rows})``, called in every backward that projects (diagnostics).
Observer = Callable[[Tensor, dict[str, Tensor]], None]


class FeedbackRouter(torch.autograd.Function):
    """Identity on the error point's output; in backward, ``e`` flows on unchanged to the head while the
    projection's slices become the gradients of the routed block outputs."""

    @staticmethod
    def forward(ctx, projection: Projection, guard: RoutingGuard, routed: list, error_point: Tensor, *outputs: Tensor):
        ctx.projection, ctx.guard, ctx.routed = projection, guard, routed
        # The identity without a copy: a new tensor on the same memory. Not a view (FSDP2 warns on views returned
        # by custom Functions) and not a clone (a copy of the logits, B x T x vocabulary, every step).
        return error_point.detach()

    @staticmethod
    def backward(ctx, error: Tensor) -> tuple:
        ctx.guard.router_ran()
        grads = ctx.projection.gradients(error, ctx.routed, ctx.needs_input_grad[4:])
        return (None, None, None, error, *grads)


class Projection:
    """The projector and the layout (point -> its columns of ``f``), built from the first error's shape."""

    def __init__(self, config: DFAConfig, output: str) -> None:
        self.config, self.output = config, output
        self.projector: nn.Module | None = None
        self.layout: dict[str, slice] = {}
        self.observers: list[Observer] = []
        #: Set by the Lightning callback: a non-finite error gives no feedback and sets :attr:`nonfinite_error`.
        self.defer_nonfinite = False
        self.nonfinite_error = False
        self._saved: dict[str, Any] | None = None  # a checkpoint's state, checked and loaded once built

    # ------------------------------------------------------------------ forward: rows, layout, projector
    def shapes(self, points: Sequence[str], records: dict[str, Tensor], error_point: Tensor) -> dict[str, PointShape]:
        """Each point's rows and features; the layout and projector are built at the first call."""
        if self.config.spatial_feedback:
            shapes = {name: SpatialShape.of(name, records[name].shape, error_point.shape) for name in points}
            error_features = error_point.shape[1] * self.config.spatial_patch**2
        else:
            rows = error_row_dims(error_point.shape, self.config.error_rows)
            shapes = {name: PointShape.of(name, records[name].shape, error_point.shape, rows) for name in points}
            error_features = math.prod(error_point.shape[rows:])
        if self.projector is None:
            self._build(shapes, error_features, error_point.device)
        check_layout_features(shapes, self.layout)
        if error_features != self.projector.in_features:
            raise ValueError(
                f"The error at {self.output!r} has {error_features} features per row, the projector takes "
                f"{self.projector.in_features} (error shape {tuple(error_point.shape)}). The projector is built at "
                "the first step: Keep the output's size fixed between steps, or set error_rows so that the varying "
                "dimension is a row."
            )
        return shapes

    def _build(self, shapes: dict[str, PointShape], error_features: int, device: torch.device) -> None:
        layout, start = layout_of((name, shape.features) for name, shape in shapes.items())
        if self._saved is not None:
            check_saved_layout(self._saved, layout, error_features)
        projector = build_projector(self.config.projector, error_features, start, self.config.seed)
        if device.type != "cpu":  # built on the CPU: check the device can hold it before moving it there
            tensors = [*projector.parameters(), *projector.buffers()]
            check_fits_in_memory(f"Projector {type(projector).__name__}", sum(t.nbytes for t in tensors), device)
        self.projector, self.layout = projector.to(device), layout
        if self._saved is not None:
            self.projector.load_state_dict(self._saved["projector"])
            self._saved = None

    # ------------------------------------------------------------------ backward: B e, sliced
    def gradients(self, error: Tensor, routed: list[tuple[str, PointShape]], needed: Sequence[bool]) -> list:
        """The gradients of the routed points' outputs: their slices of one projection of the error."""
        if self.config.spatial_feedback:
            rows = spatial_error_rows(error, self.config.spatial_patch)
        else:
            rows = error.reshape(-1, self.projector.in_features)
        # A meta tensor has no values to check (a model traced on the meta device, e.g. to count memory).
        if not rows.is_meta and nonfinite_rows(rows) is not None:
            return self._nonfinite(len(routed))
        feedback = self.projector(rows.float())
        slices = {name: feedback[:, self.layout[name]] for name, _ in routed}
        for observe in self.observers:
            observe(rows, slices)
        return [
            shape.gradient(slices[name]).to(error.dtype) if need else None
            for (name, shape), need in zip(routed, needed)
        ]

    def _nonfinite(self, points: int) -> list[None]:
        """A NaN or inf error raises, or with :attr:`defer_nonfinite` (Lightning runs) gives no feedback and is
        recorded in :attr:`nonfinite_error`: the projector never sees it."""
        if not self.defer_nonfinite:
            raise FloatingPointError(
                f"The error at {self.output!r} holds NaN or inf values; no feedback was applied. Check the loss "
                "and learning rate, or use bf16/fp32 instead of fp16."
            )
        self.nonfinite_error = True
        return [None] * points

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Seed, layout and projector state: enough to prove a resumed run uses the same projection."""
        if self.projector is None:
            return dict(self._saved) if self._saved else {"seed": self.config.seed}
        return feedback_state(self.config, self.projector.in_features, self.layout, self.projector.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the feedback state; before the first step it is checked and loaded when the projector is built."""
        check_saved_settings(state, self.config)
        if "layout" not in state:
            return
        if self.projector is None:
            self._saved = dict(state)
            return
        check_saved_layout(state, self.layout, self.projector.in_features)
        check_projector_sizes(self.projector, state["error_features"], self.projector.out_features)
        self.projector.load_state_dict(state["projector"])


def layout_of(features: Iterable[tuple[str, int]]) -> tuple[dict[str, slice], int]:
    """Consecutive column slices of ``projector(e)`` for ``(point, features)`` in order, and the total width."""
    layout, start = {}, 0
    for name, width in features:
        layout[name] = slice(start, start + width)
        start += width
    return layout, start


def check_layout_features(shapes: dict[str, PointShape], layout: dict[str, slice]) -> None:
    """Refuse a point whose features per row changed since the layout was built."""
    for name, shape in shapes.items():
        have = layout[name].stop - layout[name].start
        if shape.features != have:
            raise ValueError(
                f"Feedback point {name!r} now needs {shape.features} features per row, but the layout gave it "
                f"{have} (output shape {tuple(shape.shape)}). Keep feature sizes fixed between steps."
            )


def feedback_state(
    config: DFAConfig, error_features: int, layout: dict[str, slice], projector_state: dict[str, Any]
) -> dict[str, Any]:
    """The feedback state a checkpoint keeps (the pipeline's stages save the same, loadable into one process)."""
    return {
        "seed": config.seed,
        "error_features": error_features,
        "layout": {name: (s.start, s.stop) for name, s in layout.items()},
        "projector": projector_state,
        "lr_scale": config.lr_scale,
        "head_lr_scale": config.head_lr_scale,
    }


def check_saved_settings(state: dict[str, Any], config: DFAConfig) -> None:
    """Refuse another feedback seed (another projection); warn when ``lr_scale`` or ``head_lr_scale`` changed
    (another trajectory)."""
    if state.get("seed", config.seed) != config.seed:
        raise ValueError(
            f"The checkpoint's feedback seed is {state['seed']}, this DFA's is {config.seed}: resume with "
            f"seed={state['seed']} so the run keeps its projection."
        )
    if "lr_scale" not in state:  # saved before the first step: no trajectory yet
        return
    # A checkpoint from before head_lr_scale existed trained everything at the optimizer's own rate.
    for setting, saved in (("lr_scale", state["lr_scale"]), ("head_lr_scale", state.get("head_lr_scale", 1.0))):
        now = getattr(config, setting)
        if saved != now:
            warnings.warn(
                f"The checkpoint was trained with {setting}={saved}, this run uses {setting}={now}: the learning "
                f"rate under DFA changes from here on (set {setting}={saved} to resume the same trajectory).",
                stacklevel=4,
            )


def check_saved_layout(state: dict[str, Any], layout: dict[str, slice], error_features: int) -> None:
    saved = {name: tuple(span) for name, span in state["layout"].items()}
    current = {name: (s.start, s.stop) for name, s in layout.items()}
    if saved != current or state["error_features"] != error_features:
        raise ValueError(
            "The checkpoint's feedback layout does not match this model (or pipeline): saved "
            f"{saved} with error size {state['error_features']}, now {current} with error size {error_features}. "
            "Resume with the same model, feedback points and pipeline stages' blocks."
        )
