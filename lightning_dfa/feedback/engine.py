"""The feedback engine: Direct Feedback Alignment on any ``nn.Module``, with hooks, no Lightning.

:meth:`FeedbackEngine.attach` selects the points (:mod:`~lightning_dfa.feedback.points`) and installs the hooks:
each point's inputs are cut from the graph and its output recorded; the output point's output passes through a
:class:`~lightning_dfa.feedback.projection.FeedbackRouter`, whose backward, inside one ordinary
``loss.backward()``, gives the points their slices of ``projector(e)`` as gradients. What stays here: attach and
detach, the forward hooks, and the state.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.feedback.coverage import Coverage, check_call_order, check_coverage, watch_stray_gradients
from lightning_dfa.feedback.guard import RoutingGuard, in_backward
from lightning_dfa.feedback.hooks import EngineHook, attached_engine
from lightning_dfa.feedback.outputs import cut_inputs, cut_side_inputs, first_tensor, replace_first, swap_copies, trains
from lightning_dfa.feedback.points import point_parameters, select
from lightning_dfa.feedback.projection import FeedbackRouter, Observer, Projection
from lightning_dfa.feedback.update_scale import (
    UPDATE_STEPS,
    ScaledUpdates,
    auto_lr_scale,
    steps_taken,
    update_rates,
)


class FeedbackEngine:
    """Direct Feedback Alignment for a model's blocks, usable from plain PyTorch; takes a ``DFAConfig`` and/or
    its settings as keywords.

    Example::

        dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(model)
        dfa.scale_updates(optimizer)         # the blocks learn at lr_scale x lr
        loss_fn(model(x), y).backward()      # blocks get projector(e) slices, the head its true gradient
        dfa.detach()                         # plain backprop again
    """

    def __init__(self, config: DFAConfig | None = None, /, **settings: Any) -> None:
        self.observers: list[Observer] = []  # observe(error_rows, {point: feedback_rows}) in every backward
        self.config = DFAConfig.of(config).replace(**settings) if settings else DFAConfig.of(config)
        self.model: nn.Module | None = None
        self.points: list[str] = []
        self.backprop_points: list[str] = []  # blocks that train with their true gradient (backprop_top)
        self.guard = RoutingGuard(self.output, [])
        self._records: dict[str, Tensor] = {}  # this forward's point outputs, until the output point runs
        self._handed: dict[int, tuple[Tensor, Tensor]] = {}  # this forward's detached copies and their originals
        self._output_ran = False  # the output point ran after the last block: a second call is a reuse
        self._handles: list[RemovableHandle] = []
        self._scaled_updates: list[ScaledUpdates] = []
        self._resumed_steps = 0  # a checkpoint's optimizer steps (where lr_scale_ramp stands), until scale_updates()
        self._frozen: list[nn.Parameter] = []
        self._built_for: weakref.ref | None = None  # the model the projection was built for
        #: The source of each trainable parameter's gradient under the layout (set at :meth:`attach`; not in backprop).
        self.coverage: Coverage | None = None

    @property
    def config(self) -> DFAConfig:
        return self._config

    @config.setter
    def config(self, config: DFAConfig) -> None:
        """A new configuration (before :meth:`attach`): a new projection, empty until the first step."""
        self._config = config
        #: The error point: ``config.output``, or the module chosen for it at :meth:`attach`.
        self.output = config.output
        #: The points' share of the learning rate: ``lr_scale``, or what ``"auto"`` chose at the first forward.
        self.points_lr_scale = None if config.lr_scale == "auto" else float(config.lr_scale)
        self.projection = Projection(config, self.output)
        self.projection.observers = self.observers

    mode = property(lambda self: self.config.mode)
    lr_scale = property(lambda self: self.config.lr_scale)
    projector = property(lambda self: self.projection.projector, doc="The projector, built at the first step.")
    layout = property(lambda self: self.projection.layout, doc="Each point's columns of ``projector(e)``.")

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: nn.Module) -> FeedbackEngine:
        """Select the feedback points of ``model`` and install the hooks (none in backprop mode)."""
        if self.model is not None:
            raise RuntimeError("This DFA is already attached to a model; call detach() first.")
        other = attached_engine(model)
        if other is not None:
            raise RuntimeError(
                f"{type(model).__name__} is already attached to another DFA ({other!r}): two engines would cut and "
                "route the same blocks. Detach that one first (other.detach()), or use one DFA with several "
                "patterns in blocks=[...]."
            )
        c = self.config
        self.points, self.backprop_points, self.output = select(model, c.blocks, c.output, c.backprop_top, c.embeddings)
        # Parameters that would never train under this layout: reported (strict: an error, before anything changes).
        first_block = c.embeddings == "first_block"
        self.coverage = (
            None
            if self.mode == "backprop"
            else check_coverage(model, self.points, self.backprop_points, self.output, first_block, c.strict)
        )
        if self._built_for is not None and self._built_for() is not model:  # a sweep reusing the DFA: new layout
            self.projection.projector, self.projection.layout = None, {}
        self._built_for, self.model = weakref.ref(model), model
        self.projection.output = self.output
        self.guard = RoutingGuard(self.output, self.points)
        self._output_ran = False
        if self.mode == "frozen":
            # Only the points' own parameters: one shared with another module (a head tied to the token
            # embedding) keeps training, so the control still trains everything DFA trains besides the blocks.
            self._frozen = self._own_trainable()
            for param in self._frozen:
                param.requires_grad_(False)
        if self.mode in ("dfa", "frozen"):
            self._install_hooks()
        return self

    def _install_hooks(self) -> None:
        modules = dict(self.model.named_modules())
        for name in self.points:
            # "first_block": the first block's input keeps its gradient, so the embeddings learn from its feedback
            cut = cut_side_inputs if self._feeds_embeddings(name) else cut_inputs
            self._hook(modules[name].register_forward_pre_hook(EngineHook(cut, self), with_kwargs=True))
            self._hook(modules[name].register_forward_hook(EngineHook(self._recorder(name), self)))
        for name in self.backprop_points:  # their hidden state flows, side inputs from DFA blocks do not
            self._hook(modules[name].register_forward_pre_hook(EngineHook(cut_side_inputs, self), with_kwargs=True))
        self._hook(modules[self.output].register_forward_hook(EngineHook(self._route, self)))
        # Called even when the forward raises (an out-of-memory retry): the records of that pass are stale.
        self._hook(self.model.register_forward_hook(EngineHook(self._after_forward, self), always_call=True))
        self._handles += watch_stray_gradients(self.coverage)
        self._handles += check_call_order(self.model, self.coverage, self.config.strict)
        own, others = point_parameters(self.model, self.points)
        for params, hook in ((own, self.guard.point_grad), (others, self.guard.other_grad)):
            for param, owner in params.items():
                if param.requires_grad:
                    self._hook(param.register_post_accumulate_grad_hook(hook(owner)))

    def _hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forget_forward()

    def forget_forward(self) -> None:
        """Drop what the current forward pass recorded (it was abandoned, e.g. by an out-of-memory error)."""
        self._records.clear()
        self._handed.clear()
        self._output_ran = False
        self.guard.reset()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Plain backprop inside the block (hooks out, frozen points still frozen): for true-gradient probes."""
        active = bool(self._handles)
        self._remove_hooks()
        try:
            yield
        finally:
            if active:
                self._install_hooks()

    def scale_updates(self, *optimizers: torch.optim.Optimizer) -> None:
        """Make the points learn at ``lr_scale`` x each optimizer's learning rate and everything else at
        ``head_lr_scale`` x it (exactly as their own parameter groups would), until :meth:`detach`. The frozen
        control gets the same ``head_lr_scale``; backprop keeps the plain rate. Parameters shared with modules
        outside the points (a head tied to embedding points) learn at the head's rate."""
        if self.model is None:
            raise RuntimeError("scale_updates() needs the model: call attach(model) first.")
        rates = update_rates(self.config, lambda: self.points_lr_scale)
        if rates is None:
            return
        params = [] if self.mode == "frozen" else self._own_trainable()
        self._scaled_updates += [ScaledUpdates(optimizer, params, *rates) for optimizer in optimizers]
        self.update_steps, self._resumed_steps = self._resumed_steps, 0

    @property
    def update_steps(self) -> int:
        """Optimizer steps taken under :meth:`scale_updates` (where ``lr_scale_ramp`` stands); settable to resume."""
        return steps_taken(self._scaled_updates, self._resumed_steps)

    @update_steps.setter
    def update_steps(self, steps: int) -> None:
        self._resumed_steps = 0 if self._scaled_updates else steps  # kept for scale_updates() if not yet called
        for scaled in self._scaled_updates:
            scaled.steps = steps

    def _own_trainable(self) -> list[nn.Parameter]:
        """The points' own trainable parameters: what the frozen control freezes and ``lr_scale`` slows down."""
        return [p for p in point_parameters(self.model, self.points)[0] if p.requires_grad]

    def detach(self) -> None:
        """Remove every hook: the model and its optimizers are exactly as before (plain backprop)."""
        self._remove_hooks()
        for scaled in self._scaled_updates:
            scaled.remove()
        self._scaled_updates.clear()
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen = []
        self.model = None

    def __enter__(self) -> FeedbackEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ------------------------------------------------------------------ forward hooks
    def _recorder(self, name: str) -> Callable[..., Any]:
        def record(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = first_tensor(output, f"Feedback point {name!r}")
            if not torch.is_grad_enabled() or in_backward():
                return None
            if self._output_ran:  # a new forward pass
                self._handed.clear()
            self._output_ran = False
            if name in self._records:
                raise RuntimeError(
                    f"Feedback point {name!r} ran again before the output point {self.output!r} did: either the "
                    "output module never runs in forward (choose one that runs after every block), or the block "
                    "is called twice per forward pass (shared blocks are not supported)."
                )
            self._records[name] = hidden
            copy = hidden.detach()
            self._handed[id(copy)] = (copy, hidden)
            return replace_first(output, copy)

        return record

    def _route(self, module: nn.Module, args: tuple, output: Any) -> Any:
        error_point = first_tensor(output, f"Output point {self.output!r}")
        if not torch.is_grad_enabled() or in_backward():
            return None
        records, self._records = self._records, {}
        if not records and self._output_ran and self.points:
            raise RuntimeError(
                f"The output point {self.output!r} ran twice in one forward pass (or again without the blocks "
                "running in between): DFA takes the error at one call of the output module. Call it once per "
                f"forward pass (e.g. on the concatenated inputs), or choose as output a module that runs once, "
                "after every block."
            )
        self._output_ran = True
        self.guard.forward_ran()
        if not error_point.requires_grad and not any(r.requires_grad for r in records.values()):
            return None  # nothing trains: no error to project this time
        missing = [name for name in self.points if name not in records]
        if missing:
            raise RuntimeError(
                f"Feedback points {missing} did not run before the output point {self.output!r}; every block must "
                "run before the error is taken. Choose an output module that runs last (e.g. the head)."
            )
        shapes = self.projection.shapes(self.points, records, error_point)
        if self.points_lr_scale is None:  # lr_scale="auto": known from the first error
            self.points_lr_scale = auto_lr_scale(error_point.shape, self.config.head_lr_scale)
            for scaled in self._scaled_updates:  # a step already under way (Lightning's closure) learns it now
                scaled.rescale()
        # The frozen-blocks control feeds no block (parameters it shares with the head train with their true
        # gradient), so it pays for no projection. With embeddings="first_block" the control still feeds the
        # (frozen) first block: the embeddings learn as in the DFA run, so the control isolates the blocks' updates.
        fed = [name for name in self.points if self.mode != "frozen" or self._feeds_embeddings(name)]
        routed = [(name, shapes[name]) for name in fed if trains(self.model.get_submodule(name), name, records[name])]
        if not routed:
            return None
        self.guard.router_applied()
        outputs = (records[name] for name, _ in routed)
        return replace_first(output, FeedbackRouter.apply(self.projection, self.guard, routed, error_point, *outputs))

    def _feeds_embeddings(self, name: str) -> bool:
        return self.config.embeddings == "first_block" and name == self.points[0]

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if sys.exc_info()[1] is not None:  # the forward pass raised: a retry must not find its records
            self.forget_forward()
            return None
        # The model returns block outputs (hidden_states): give the caller the blocks' own outputs, not the
        # detached copies the model ran on, so a loss term on them reaches the block (added to its feedback).
        handed, self._handed = self._handed, {}
        return swap_copies(output, handed) if handed and torch.is_grad_enabled() else None

    def check_routed(self) -> None:
        """Raise if block outputs were recorded but the output point never ran, or if the loss did not use the
        output point's output (call after backward)."""
        if self._records:
            raise RuntimeError(
                f"The output point {self.output!r} did not run in the forward pass, so the feedback points "
                f"{list(self._records)} got no feedback. Choose an output module that runs after every block."
            )
        self.guard.check_after_backward(self._modules_with_gradients)

    def _modules_with_gradients(self) -> list[str]:
        others = point_parameters(self.model, self.points)[1]
        return list(dict.fromkeys(owner for param, owner in others.items() if param.grad is not None))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Seed, layout and projector state (enough to prove a resumed run uses the same projection), and the
        optimizer steps taken (where ``lr_scale_ramp`` stands)."""
        return {**self.projection.state_dict(), UPDATE_STEPS: self.update_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the feedback state; the projector is rebuilt (and checked) at the next forward pass."""
        self.update_steps = int(state.get(UPDATE_STEPS, 0))
        self.projection.load_state_dict({k: v for k, v in state.items() if k != UPDATE_STEPS})

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(blocks={c.blocks!r}, output={self.output!r}, projector={c.projector!r}, "
            f"seed={c.seed}, mode={c.mode!r})"
        )
