"""The feedback engine: Direct Feedback Alignment on any ``nn.Module``, with hooks, no Lightning.

Inside one ordinary ``loss.backward()``, :class:`FeedbackRouter` gives the points the slices of ``projector(e)``
as gradients (docs/architecture.md draws the hooks).
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dfa import _compat
from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.feedback.coverage import Coverage, check_call_order, check_coverage, watch_stray_gradients
from lightning_dfa.feedback.outputs import any_requires_grad, detach_inputs, first_tensor, replace_first
from lightning_dfa.feedback.points import auto_output, embedding_points, resolve_module, resolve_points
from lightning_dfa.feedback.router import FeedbackRouter, in_backward
from lightning_dfa.feedback.rows import PointShape, SpatialShape, error_row_dims, spatial_error_rows
from lightning_dfa.feedback.update_scale import ScaledUpdates, auto_lr_scale
from lightning_dfa.projectors import build_projector
from lightning_dfa.projectors.checks import check_fits_in_memory
from lightning_dfa.projectors.registry import check_projector_sizes


class FeedbackEngine:
    """Direct Feedback Alignment for a model's blocks, usable from plain PyTorch (docs/feedback.md).

    Takes a :class:`~lightning_dfa.feedback.config.DFAConfig` and/or its settings as keywords.

    Example::

        dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(model)
        dfa.scale_updates(optimizer)         # the blocks learn at lr_scale x lr
        loss_fn(model(x), y).backward()      # blocks get projector(e) slices, the head its true gradient
        dfa.detach()                         # plain backprop again
    """

    def __init__(self, config: DFAConfig | None = None, /, **settings: Any) -> None:
        self.config = DFAConfig.of(config).replace(**settings) if settings else DFAConfig.of(config)
        #: The error point: ``config.output``, or the module chosen for it at :meth:`attach`.
        self.output = self.config.output
        #: The points' share of the learning rate in use: ``lr_scale``, or what ``"auto"`` chose at the first forward.
        self.points_lr_scale: float | None = None if self.lr_scale == "auto" else float(self.lr_scale)
        #: Set by the Lightning callback: a non-finite error gives no feedback and sets :attr:`nonfinite_error`.
        self.defer_nonfinite = False
        self.nonfinite_error = False
        self._scaled_updates: list[ScaledUpdates] = []
        #: Blocks that train with their true gradient (``backprop_top``), above the DFA points.
        self.backprop_points: list[str] = []
        self.projector: nn.Module | None = None
        self.layout: dict[str, slice] = {}
        self.points: list[str] = []
        self.model: nn.Module | None = None
        self._records: dict[str, Tensor] = {}
        self._handed: dict[int, tuple[Tensor, Tensor]] = {}  # this forward's detached copies and their originals
        self._handles: list[RemovableHandle] = []
        self._built_for: weakref.ref | None = None  # the model the layout and projector were built for
        self._output_ran = False  # the output point ran after the last block: a second call is a reuse
        self._forwards = 0  # forward passes through the output point since attach (0: the hooks were bypassed)
        self._routers_pending = 0  # routers applied in forward whose backward has not run yet
        self._router_task = self._unrouted_task = -1  # graph tasks of the last router backward, of a check
        self._loss_used: list[str] = []  # modules that got gradients in a backward pass that ran no router
        self._frozen: list[nn.Parameter] = []
        #: Called as ``observe(error, {point: feedback})`` in every backward (rows x features), for diagnostics.
        self.observers: list[Callable[[Tensor, dict[str, Tensor]], None]] = []
        self._saved_state: dict[str, Any] | None = None
        #: The source of each trainable parameter's gradient under the layout (set at :meth:`attach`; not in backprop).
        self.coverage: Coverage | None = None

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def lr_scale(self) -> float | str:
        return self.config.lr_scale

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
        points, top = self._select_points(model)
        blocks = points + top
        output = self.config.output if self.config.output is not None else auto_output(model, blocks)
        if output is None:
            raise ValueError(
                f"output=None and no error point found in {type(model).__name__}: it holds no HuggingFace model or "
                f"UNet, and no module with trainable parameters is registered after the last block {blocks[-1]!r}. "
                "Name the module whose output the loss uses (its gradient is the error), e.g. the head "
                f"(top-level children: {[n for n, _ in model.named_children()]}), with DFA(output=...), "
                "DFAStrategy(output=...) or configure_dfa()."
            )
        resolve_module(model, output, role="output")
        for point in blocks:
            if output == point or output.startswith(point + "."):
                raise ValueError(
                    f"The output point {output!r} lies inside the feedback point {point!r}: the error must be taken "
                    "after every block. Choose an output outside the blocks that runs after them, e.g. the head."
                )
        # Parameters that would never train under this layout: reported (strict: an error, before anything changes).
        first_block = self.config.embeddings == "first_block"
        self.coverage = (
            None
            if self.mode == "backprop"
            else check_coverage(model, points, top, output, first_block, self.config.strict)
        )
        if self._built_for is not None and self._built_for() is not model:  # a sweep reusing the DFA: new layout
            self.projector, self.layout, self._built_for = None, {}, None
        self.model, self.points, self.backprop_points, self.output = model, points, top, output
        self._forwards, self._routers_pending, self._output_ran = 0, 0, False
        if self.mode == "frozen":
            # Only the points' own parameters: one shared with another module (a head tied to the token
            # embedding) keeps training, so the control still trains everything DFA trains besides the blocks.
            self._frozen = self._own_trainable()
            for param in self._frozen:
                param.requires_grad_(False)
        if self.mode in ("dfa", "frozen"):
            self._install_hooks()
        return self

    def _select_points(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """The DFA points (embeddings included if asked) and the top blocks that keep backprop."""
        blocks, backprop_top = resolve_points(model, self.config.blocks), self.config.backprop_top
        if backprop_top >= len(blocks):
            raise ValueError(
                f"backprop_top={backprop_top} leaves no block to train with DFA among the {len(blocks)} "
                f"blocks {blocks}; use at most {len(blocks) - 1}, or mode='backprop' for plain backprop."
            )
        top = blocks[len(blocks) - backprop_top :]
        points = blocks[: len(blocks) - backprop_top]
        if self.config.embeddings is True:
            inside = [p for p in blocks if p]
            extra = [
                e
                for e in embedding_points(model)
                if not any(e == p or e.startswith(p + ".") or p.startswith(e + ".") for p in inside)
            ]
            if not extra:
                raise ValueError(
                    f"embeddings=True found no embedding module outside the blocks of {type(model).__name__} "
                    "(nn.Embedding, patch embeddings, a UNet's conv_in/time_embedding); name them in blocks instead."
                )
            order = {name: i for i, (name, _) in enumerate(model.named_modules())}
            points = sorted(points + extra, key=order.__getitem__)
        return points, top

    def _install_hooks(self) -> None:
        modules = dict(self.model.named_modules())
        for name in self.points:
            # "first_block": the first block's input keeps its gradient, so the embeddings learn from its feedback
            cut = _cut_side_inputs if self._feeds_embeddings(name) else self._cut_inputs
            self._handles.append(modules[name].register_forward_pre_hook(_Hook(cut), with_kwargs=True))
            self._handles.append(modules[name].register_forward_hook(_Hook(self._recorder(name))))
        for name in self.backprop_points:  # their hidden state flows, side inputs from DFA blocks do not
            self._handles.append(modules[name].register_forward_pre_hook(_Hook(_cut_side_inputs), with_kwargs=True))
        self._handles.append(modules[self.output].register_forward_hook(_Hook(self._route)))
        # Called even when the forward raises (an out-of-memory retry): the records of that pass are stale.
        self._handles.append(self.model.register_forward_hook(_Hook(self._after_forward), always_call=True))
        self._handles += watch_stray_gradients(self.coverage)
        self._handles += check_call_order(self.model, self.coverage, self.config.strict)
        own, others = point_parameters(self.model, self.points)
        for params, hook in ((own, self._point_grad), (others, self._other_grad)):
            for param, owner in params.items():
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(hook(owner)))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forget_forward()

    def forget_forward(self) -> None:
        """Drop what the current forward pass recorded (it was abandoned, e.g. by an out-of-memory error)."""
        self._records.clear()
        self._handed.clear()
        self._output_ran, self._routers_pending, self._loss_used = False, 0, []

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
        """Make the points learn at ``lr_scale`` x each optimizer's learning rate (exactly as their own parameter
        group would), until :meth:`detach`. Only in ``mode="dfa"``: the baselines keep the plain rate. Parameters
        shared with modules outside the points (a head tied to embedding points) keep the full rate."""
        if self.model is None:
            raise RuntimeError("scale_updates() needs the model: call attach(model) first.")
        if self.mode != "dfa" or self.lr_scale == 1.0:
            return
        params = self._own_trainable()
        scale = (lambda: self.points_lr_scale) if self.lr_scale == "auto" else self.lr_scale
        self._scaled_updates += [ScaledUpdates(optimizer, params, scale) for optimizer in optimizers]

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

    # ------------------------------------------------------------------ hooks
    def _cut_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if torch.is_grad_enabled():
            args, kwargs = detach_inputs(args, kwargs, "all")
            if args and isinstance(args[0], Tensor) and torch.is_floating_point(args[0]) and reentrant(module):
                # Reentrant checkpointing only runs backward through positional inputs that require grad:
                # here (and only here) the block input must require grad, at the cost of its unused gradient.
                args = (args[0].requires_grad_(), *args[1:])
            return args, kwargs
        if any_requires_grad((args, kwargs)):
            raise RuntimeError(
                "A feedback point runs without grad on inputs that require grad: this is reentrant activation "
                "checkpointing, which DFA cannot route feedback through. Use non-reentrant checkpointing: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
                "or torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
            )
        return None

    def _recorder(self, name: str):
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
        self._output_ran, self._forwards = True, self._forwards + 1
        if not error_point.requires_grad and not any(r.requires_grad for r in records.values()):
            return None  # nothing trains: no error to project this time
        missing = [name for name in self.points if name not in records]
        if missing:
            raise RuntimeError(
                f"Feedback points {missing} did not run before the output point {self.output!r}; every block must "
                "run before the error is taken. Choose an output module that runs last (e.g. the head)."
            )
        shapes = self._point_shapes(records, error_point)
        # The frozen-blocks control feeds no block (parameters it shares with the head train with their true
        # gradient), so it pays for no projection. A frozen head with trainable blocks is routed all the same.
        # With embeddings="first_block" the control still feeds the (frozen) first block: what feeds it (the
        # embeddings) learns as in the DFA run, so the control isolates what the blocks' own updates add.
        fed = [name for name in self.points if self.mode != "frozen" or self._feeds_embeddings(name)]
        routed = [(name, shapes[name]) for name in fed if self._trains(name, records[name])]
        if not routed:
            return None
        self._routers_pending += 1
        routed_outputs = (records[name] for name, _ in routed)
        return replace_first(output, FeedbackRouter.apply(self, routed, error_point, *routed_outputs))

    def _feeds_embeddings(self, name: str) -> bool:
        return self.config.embeddings == "first_block" and name == self.points[0]

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if sys.exc_info()[1] is not None:  # the forward pass raised: a retry must not find its records
            self.forget_forward()
            return None
        # The model returns block outputs (hidden_states): give the caller the blocks' own outputs, not the
        # detached copies the model ran on, so a loss term on them reaches the block (added to its feedback).
        handed, self._handed = self._handed, {}
        return _swap_copies(output, handed) if handed and torch.is_grad_enabled() else None

    def _point_grad(self, owner: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if not self._forwards:
                raise RuntimeError(
                    f"A parameter of {owner!r}, inside a feedback point, received a gradient although no forward pass "
                    "since dfa.attach() ran the DFA hooks: this is backprop, not DFA. A model compiled with "
                    "torch.compile and run before attach() keeps its compiled graph, which bypasses hooks added "
                    "later. Attach first, then compile (dfa.attach(model); model = torch.compile(model)), or call "
                    "torch.compiler.reset() after attach()."
                )

        return hook

    def _other_grad(self, owner: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            task = _compat.current_graph_task_id()
            if not self._routers_pending or task == self._router_task:
                return
            if not self._loss_used:  # decide at the end of this backward pass: the router may still run
                self._unrouted_task = task
                _compat.queue_backward_callback(self._check_error_used)
            if owner not in self._loss_used:
                self._loss_used.append(owner)

        return hook

    def _check_error_used(self) -> None:
        used, self._loss_used = self._loss_used, []
        if self._router_task != self._unrouted_task:
            self._routers_pending = 0
            raise RuntimeError(self._unused_error_message(used))

    def _unused_error_message(self, used: list[str]) -> str:
        used_text = f"; it used {used}" if used else ""
        return (
            f"The loss does not use the output of the error point {self.output!r}: it got no gradient in this "
            f"backward pass{used_text}. The feedback points {self.points} got no feedback and would not train. "
            "Set output= to the module whose output the loss is computed from"
            + (f" (e.g. output={used[0]!r})" if used else "")
            + f", or compute the loss from {self.output!r}'s output. A forward pass that is not trained on should "
            "run under torch.no_grad()."
        )

    def _trains(self, name: str, hidden: Tensor) -> bool:
        if hidden.requires_grad:
            return True
        if not any(p.requires_grad for p in self.model.get_submodule(name).parameters()):
            return False  # a frozen block: nothing to train
        if not (hidden.is_floating_point() or hidden.is_complex()):
            raise TypeError(
                f"Feedback point {name!r} has trainable parameters but returns a {hidden.dtype} tensor, which "
                "cannot carry a gradient. Select as point the module whose output is the floating-point hidden "
                "state (a tuple may carry other values after it)."
            )
        raise RuntimeError(
            f"Feedback point {name!r} has trainable parameters but its output does not require grad; was it "
            "run under torch.no_grad() or reentrant checkpointing?"
        )

    def check_routed(self) -> None:
        """Raise if block outputs were recorded but the output point never ran, or if the loss did not use the
        output point's output (call after backward)."""
        if self._records:
            raise RuntimeError(
                f"The output point {self.output!r} did not run in the forward pass, so the feedback points "
                f"{list(self._records)} got no feedback. Choose an output module that runs after every block."
            )
        pending, self._routers_pending = self._routers_pending, 0
        if pending:
            _, others = point_parameters(self.model, self.points)
            used = list(dict.fromkeys(owner for param, owner in others.items() if param.grad is not None))
            raise RuntimeError(self._unused_error_message(used))

    # ------------------------------------------------------------------ layout and projection
    def _point_shapes(self, records: dict[str, Tensor], error_point: Tensor) -> dict[str, PointShape]:
        """Each point's rows and feature size; builds the layout and projector at the first call."""
        if self.config.spatial_feedback:
            shapes = {name: SpatialShape.of(name, records[name].shape, error_point.shape) for name in self.points}
            error_features = error_point.shape[1] * self.config.spatial_patch**2
        else:
            rows = error_row_dims(error_point.shape, self.config.error_rows)
            shapes = {name: PointShape.of(name, records[name].shape, error_point.shape, rows) for name in self.points}
            error_features = math.prod(error_point.shape[rows:])
        if self.projector is None:
            self._build(shapes, error_features, error_point.device)
            if self.lr_scale == "auto":
                self.points_lr_scale = auto_lr_scale(error_point.shape)
                for scaled in self._scaled_updates:  # a step already under way (Lightning's closure) learns it now
                    scaled.rescale()
        for name, shape in shapes.items():
            have = self.layout[name].stop - self.layout[name].start
            if shape.features != have:
                raise ValueError(
                    f"Feedback point {name!r} now needs {shape.features} features per row, but the layout gave it "
                    f"{have} (output shape {tuple(shape.shape)}). Keep feature sizes fixed between steps."
                )
        if error_features != self.projector.in_features:
            raise ValueError(
                f"The error at {self.output!r} has {error_features} features per row, the projector takes "
                f"{self.projector.in_features} (error shape {tuple(error_point.shape)}). The projector is built at "
                "the first step: Keep the output's size fixed between steps, or set error_rows so that the varying "
                "dimension is a row."
            )
        return shapes

    def _build(self, shapes: dict[str, PointShape], error_features: int, device: torch.device) -> None:
        layout, start = {}, 0
        for name, shape in shapes.items():
            layout[name] = slice(start, start + shape.features)
            start += shape.features
        if self._saved_state is not None:
            _check_saved_layout(self._saved_state, layout, error_features)
        projector = build_projector(self.config.projector, error_features, start, self.config.seed)
        if device.type != "cpu":  # built on the CPU: check the device can hold it before moving it there
            tensors = [*projector.parameters(), *projector.buffers()]
            check_fits_in_memory(f"Projector {type(projector).__name__}", sum(t.nbytes for t in tensors), device)
        self.projector = projector.to(device)
        self.layout, self._built_for = layout, weakref.ref(self.model)
        if self._saved_state is not None:
            self.projector.load_state_dict(self._saved_state["projector"])
            self._saved_state = None

    def _feedback(self, error: Tensor, routed: list[tuple[str, PointShape]], needed: Sequence[bool]) -> list:
        """The gradients of the routed points' outputs: slices of one projection of the error."""
        if self.config.spatial_feedback:
            flat = spatial_error_rows(error, self.config.spatial_patch)
        else:
            flat = error.reshape(-1, self.projector.in_features)
        # A meta tensor has no values to check (a model traced on the meta device, e.g. to count memory).
        if not flat.is_meta and not _all_finite(flat):
            return self._nonfinite(len(routed))
        feedback = self.projector(flat.float())
        slices = {name: feedback[:, self.layout[name]] for name, _ in routed}
        for observe in self.observers:
            observe(flat, slices)
        grads: list[Tensor | None] = []
        for (name, shape), need in zip(routed, needed):
            grads.append(shape.gradient(slices[name]).to(error.dtype) if need else None)
        return grads

    def _router_ran(self) -> None:
        self._routers_pending = max(self._routers_pending - 1, 0)
        self._router_task = _compat.current_graph_task_id()

    def _nonfinite(self, points: int) -> list[Tensor | None]:
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
            return dict(self._saved_state) if self._saved_state else {"seed": self.config.seed}
        return {
            "seed": self.config.seed,
            "error_features": self.projector.in_features,
            "layout": {name: (s.start, s.stop) for name, s in self.layout.items()},
            "projector": self.projector.state_dict(),
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the feedback state; the projector is rebuilt (and checked) at the next forward pass."""
        if state.get("seed", self.config.seed) != self.config.seed:
            raise ValueError(
                f"The checkpoint's feedback seed is {state['seed']}, this DFA's is {self.config.seed}: resume with "
                f"seed={state['seed']} so the run keeps its projection."
            )
        if "layout" not in state:
            return
        saved_scale = state.get("lr_scale", self.lr_scale)
        if saved_scale != self.lr_scale:
            warnings.warn(
                f"The checkpoint was trained with lr_scale={saved_scale}, this run uses lr_scale={self.lr_scale}: "
                f"the feedback points' learning rate changes from here on (set lr_scale={saved_scale} to resume "
                "the same trajectory).",
                stacklevel=2,
            )
        if self.projector is None:
            self._saved_state = dict(state)
            return
        _check_saved_layout(state, self.layout, self.projector.in_features)
        check_projector_sizes(self.projector, state["error_features"], self.projector.out_features)
        self.projector.load_state_dict(state["projector"])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{type(self).__name__}(blocks={c.blocks!r}, output={self.output!r}, projector={c.projector!r}, "
            f"seed={c.seed}, mode={c.mode!r})"
        )


class _Hook:
    """A hook of one engine. A deep copy of the model (an EMA or SWA copy) gets a no-op instead: the copy is
    not attached, and must not write into this engine's records."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.engine = getattr(function, "__self__", None)

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)

    def __deepcopy__(self, memo: dict) -> Callable[..., None]:
        return _no_op


def _no_op(*args: Any) -> None:
    return None


def _swap_copies(value: Any, handed: dict[int, tuple[Tensor, Tensor]]) -> Any:
    """``value`` with every detached copy of a point's output replaced by the output itself (in place in dicts,
    e.g. a HuggingFace ``ModelOutput``)."""
    if isinstance(value, Tensor):
        copy, original = handed.get(id(value), (None, None))
        return original if copy is value else value
    if isinstance(value, list) or isinstance(value, tuple) and not hasattr(value, "_fields"):
        return type(value)(_swap_copies(item, handed) for item in value)
    if isinstance(value, dict):
        for key, item in list(value.items()):
            swapped = _swap_copies(item, handed)
            if swapped is not item:
                value[key] = swapped
    return value


def attached_engine(model: nn.Module) -> FeedbackEngine | None:
    """The engine whose hooks are on ``model``, if any."""
    for module in model.modules():
        for hook in _compat.forward_hooks(module):
            if isinstance(hook, _Hook) and isinstance(hook.engine, FeedbackEngine):
                return hook.engine
    return None


def point_parameters(model: nn.Module, points: Sequence[str]) -> tuple[dict[Tensor, str], dict[Tensor, str]]:
    """The parameters of the feedback points alone, and all the others, each with the module that owns it. A
    parameter shared with a module outside the points (a head tied to the token embedding) is one of the others."""
    inside: dict[Tensor, str] = {}
    outside: dict[Tensor, str] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owner = path.rpartition(".")[0]
        into = inside if any(owner == p or owner.startswith(p + ".") for p in points) else outside
        into.setdefault(param, owner)
    return {param: owner for param, owner in inside.items() if param not in outside}, outside


def reentrant(module: nn.Module) -> bool:
    """Whether a HuggingFace layer checkpoints its ``forward`` with reentrant checkpointing."""
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return False
    return _compat.hf_reentrant_checkpointing(module)


def _all_finite(rows: Tensor) -> bool:
    """Whether every value is finite: NaN and inf reach the row sums, so the full check runs only on overflow
    (one read of the error and a reduction of N values instead of a mask of N x d_e)."""
    return bool(torch.isfinite(rows.sum(dim=1)).all()) or bool(torch.isfinite(rows).all())


def _cut_side_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A backprop block's pre-hook: its hidden state keeps its gradient, inputs from DFA blocks (skips) do not."""
    return detach_inputs(args, kwargs, "side") if torch.is_grad_enabled() else None


def _check_saved_layout(state: dict[str, Any], layout: dict[str, slice], error_features: int) -> None:
    saved = {name: tuple(span) for name, span in state["layout"].items()}
    current = {name: (s.start, s.stop) for name, s in layout.items()}
    if saved != current or state["error_features"] != error_features:
        raise ValueError(
            "The checkpoint's feedback layout does not match this model: saved "
            f"{saved} with error size {state['error_features']}, now {current} with error size {error_features}. "
            "Resume with the same model and feedback points."
        )
