"""``DFA``: the feedback engine as a Lightning ``Callback``, so any strategy can train with DFA.

Besides attaching the engine for ``fit``, the callback guards every optimizer step against non-finite
values (``nonfinite=``): a NaN or infinite loss, error (the gradient at the output point) or gradient
either stops the run with a message that names what, where and when (``"stop"``, the default), or
skips the step, so the weights and the optimizer state stay exactly as they were (``"skip"``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.loggers import guard_loggers
from lightning_dfa.projectors.registry import check_projector_spec

#: Accepted values of ``DFA(nonfinite=...)``.
NONFINITE = ("stop", "skip")

#: The metric that counts skipped steps (logged through the LightningModule's loggers with ``nonfinite="skip"``).
SKIPPED_METRIC = "dfa/nonfinite_steps"

_ADVICE = (
    "Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), check the data for NaN or inf, "
    "use bf16 or fp32 rather than fp16"
)


class DFA(FeedbackEngine, Callback):
    """Direct Feedback Alignment for a LightningModule (or, via :meth:`attach`, any ``nn.Module``).

    As a callback it attaches at the start of ``fit`` (``on_fit_start``: after the model's ``setup`` and
    ``configure_model``, so models may build their layers there) and detaches at its end; its feedback state
    (seed, layout, projector) is saved in checkpoints and restored on resume.

    Args:
        *args, **kwargs: the :class:`~lightning_dfa.feedback.FeedbackEngine` arguments (``blocks``, ``output``,
            ``projector``, ``seed``, ``mode``, ...).
        nonfinite: what a training step with a NaN or infinite loss, error or gradient does. ``"stop"``
            (default) raises ``FloatingPointError`` before the optimizer step, naming what was non-finite and at
            which step; ``"skip"`` drops that step's gradients (the weights and the optimizer state stay
            bit-identical), warns, and counts it in ``dfa/nonfinite_steps`` (logged every step). Only Lightning
            runs are guarded; with :meth:`attach` alone a non-finite error raises (``check_finite``).
        nonfinite_patience: with ``"skip"``, the run stops after this many consecutive skipped steps (when
            every step is non-finite, skipping cannot help).

    The callback also guards the run's loggers (:func:`lightning_dfa.loggers.guard_loggers`): one that raises
    (W&B unreachable, disk full) is switched off with a warning, and training and checkpointing go on.

    Skipping happens after ``backward``, so the learning-rate scheduler and ``global_step`` still advance,
    as with an fp16 ``GradScaler`` skip; BatchNorm running statistics updated by that step's forward pass
    are not rolled back. Under fp16 mixed precision (a ``GradScaler``), non-finite errors and gradients with
    a finite loss are overflows that the scaler handles: the step is skipped and counted even with ``"stop"``.

    Example::

        trainer = Trainer(callbacks=[DFA(blocks="blocks.*", output="head")])   # any strategy
        trainer = Trainer(strategy="dfa")                                      # the same, as a strategy
        trainer = Trainer(callbacks=[DFA(blocks="blocks.*", output="head", nonfinite="skip")])

    Without Lightning::

        with DFA(blocks="transformer.h.*", output="lm_head").attach(gpt2) as dfa:
            gpt2(input_ids, labels=input_ids).loss.backward()
            dfa.projector, dfa.layout   # audit: grad of point i == dfa.projector(e)[:, dfa.layout[i]]
    """

    def __init__(self, *args: Any, nonfinite: str = "stop", nonfinite_patience: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if nonfinite not in NONFINITE:
            raise ValueError(
                f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}: 'stop' ends the run at the first NaN or "
                "inf, 'skip' skips such steps."
            )
        if not isinstance(nonfinite_patience, int) or isinstance(nonfinite_patience, bool) or nonfinite_patience < 1:
            raise ValueError(f"nonfinite_patience must be a positive integer, got {nonfinite_patience!r}.")
        self.nonfinite = nonfinite
        self.nonfinite_patience = nonfinite_patience
        #: Optimizer steps skipped for non-finite values (kept in checkpoints).
        self.nonfinite_steps = 0
        #: What the last skipped (or stopping) step found, e.g. ``"step 12: the loss is nan"``.
        self.last_nonfinite: str | None = None
        self._consecutive = 0
        self._trainer: pl.Trainer | None = None
        self._told_scale = False
        self._losses: list[Tensor] = []  # this step's losses (one per micro-batch), checked at the optimizer step
        self._bad_error = False

    def settings(self) -> dict[str, Any]:
        """The constructor arguments of this DFA (the engine's, plus ``nonfinite`` and ``nonfinite_patience``)."""
        return {**super().settings(), "nonfinite": self.nonfinite, "nonfinite_patience": self.nonfinite_patience}

    @property
    def state_key(self) -> str:
        return "lightning_dfa.DFA"

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_projector_spec(self.projector_spec)  # a typo fails now, not at the first forward pass
        guard_loggers(trainer)  # a failing logger (W&B down, disk full) warns and is switched off

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After setup() and configure_model(): models may build their layers there.
        if self.model is not None:
            self.detach()
        output_auto = self.output is None
        self.attach(pl_module)
        self.scale_updates(*trainer.optimizers)  # the optimizers exist now (strategy.setup ran)
        rank_zero_info(_chosen(self, output_auto))  # automatic choices must be visible before the run goes far
        self._trainer = trainer
        self._told_scale = False
        self._reset_step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach()
        self._trainer = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.model is not None:  # fit interrupted by an exception
            self.detach()
        if stage == "fit":
            self._trainer = None
            self._reset_step()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.forget_forward()  # a retry after an exception (BatchSizeFinder after out of memory) starts clean

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_routed()
        if self.lr_scale == "auto" and self.points_lr_scale is not None and not self._told_scale:
            self._told_scale = True  # known from the first error only
            rank_zero_info(f"DFA: lr_scale='auto' set the points' learning rate to {self.points_lr_scale:.3g} x lr")

    # ------------------------------------------------------------------ non-finite steps
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())  # checked once per optimizer step: no extra device sync here

    def _nonfinite_error(self, points: int) -> list[Tensor | None]:
        """In a Lightning run a non-finite error is recorded, not raised: the blocks get no feedback from this
        micro-batch (the projector never sees it), and :meth:`on_before_optimizer_step` stops or skips the step."""
        if self._trainer is None:
            return super()._nonfinite_error(points)
        self._bad_error = True
        return [None] * points

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        losses, bad_error = self._losses, self._bad_error
        self._reset_step()
        found = bad_error or _any_nonfinite([_total(loss) for loss in losses] + [_total(p.grad) for p in params])
        if not trainer.strategy.reduce_boolean_decision(found, all=False):
            self._consecutive = 0
            self._log_count(pl_module)
            return
        causes = self._causes(pl_module, losses, bad_error, params)
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        self.last_nonfinite = f"{where}: {'; '.join(causes)}"
        loss_finite = not any(c.startswith("the loss") for c in causes)
        overflow = loss_finite and getattr(trainer.precision_plugin, "scaler", None) is not None
        if self.nonfinite == "stop" and not overflow:
            raise FloatingPointError(
                f"Non-finite values at training {where}: {'; '.join(causes)}. The run stops before the optimizer "
                f"step, so the weights are those of the previous step. {_ADVICE}, or train with "
                "DFA(nonfinite='skip') or DFAStrategy(nonfinite='skip') to skip such steps."
            )
        for param in params:  # no gradient, no update: the optimizer leaves these weights and their state alone
            param.grad = None
        self.nonfinite_steps += 1
        self._consecutive += 1
        self._log_count(pl_module)
        if self._consecutive >= self.nonfinite_patience:
            raise FloatingPointError(
                f"{self._consecutive} consecutive training steps were non-finite and skipped (last at {where}: "
                f"{'; '.join(causes)}); skipping cannot recover from this. {_ADVICE}, or resume from an earlier "
                "checkpoint."
            )
        if self.nonfinite_steps == 1 or self._consecutive == 1:
            rank_zero_warn(
                f"Skipped training {where}: {'; '.join(causes)}. The weights are unchanged; skipped steps so far: "
                f"{self.nonfinite_steps} (logged as {SKIPPED_METRIC!r}).",
                category=RuntimeWarning,
            )

    def _causes(
        self, pl_module: pl.LightningModule, losses: list[Tensor], bad_error: bool, params: list[torch.nn.Parameter]
    ) -> list[str]:
        causes = [f"the loss is {_describe(loss)}" for loss in losses if not bool(torch.isfinite(loss).all())][:1]
        if bad_error:
            causes.append(f"the error at the output point {self.output!r} holds NaN or inf")
        names = {p: n for n, p in pl_module.named_parameters()}
        bad = [names.get(p, "?") for p in params if not bool(torch.isfinite(_local(p.grad)).all())]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            causes.append(f"the gradients of {bad[:5]}{more} hold NaN or inf")
        if not causes:
            causes.append("the gradients overflow (their sums are not finite)")
        return causes

    def _log_count(self, pl_module: pl.LightningModule) -> None:
        if self.nonfinite == "skip" or self.nonfinite_steps:
            logger = bool(pl_module.trainer.loggers)
            pl_module.log(SKIPPED_METRIC, float(self.nonfinite_steps), on_step=True, on_epoch=False, logger=logger)

    def _reset_step(self) -> None:
        self._losses, self._bad_error = [], False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**FeedbackEngine.state_dict(self), "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.nonfinite_steps = int(state.pop("nonfinite_steps", 0))
        FeedbackEngine.load_state_dict(self, state)


def _local(tensor: Tensor) -> Tensor:
    """The local part of a sharded (DTensor) gradient, the values of a sparse one, else the tensor."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.coalesce().values() if tensor.is_sparse else tensor


def _total(tensor: Tensor) -> Tensor:
    """A float32 sum: not finite if any entry is NaN or inf (or, for absurd values, if the sum overflows)."""
    return _local(tensor).detach().sum(dtype=torch.float32)


def _any_nonfinite(totals: list[Tensor]) -> bool:
    by_device: dict[torch.device, list[Tensor]] = {}
    for total in totals:
        by_device.setdefault(total.device, []).append(total)
    return any(not bool(torch.isfinite(torch.stack(group)).all()) for group in by_device.values())


def _describe(loss: Tensor) -> str:
    values = loss.detach().float().flatten()
    value = float(values[~torch.isfinite(values)][0])
    return "nan" if math.isnan(value) else str(value)


def _chosen(dfa: DFA, output_auto: bool) -> str:
    """What DFA trains, in one line: ``DFA: 4 feedback points h.0 ... h.3 (auto), error at lm_head (auto), ...``."""
    points = dfa.points
    shown = " ".join(points) if len(points) <= 3 else f"{points[0]} ... {points[-1]}"
    line = (
        f"DFA: {len(points)} feedback points {shown}{' (auto)' if dfa.blocks == 'auto' else ''}, error at "
        f"{dfa.output}{' (auto)' if output_auto else ''}, projector {_projector_name(dfa.projector_spec)}"
    )
    if dfa.backprop_points:
        line += f", {len(dfa.backprop_points)} top blocks by backprop"
    if dfa.mode != "dfa":
        return f"{line}, mode {dfa.mode}"
    scale = "auto (min(0.1, 1/sqrt(error width)))" if dfa.lr_scale == "auto" else dfa.lr_scale
    return f"{line}, points at lr_scale={scale} x lr"


def _projector_name(spec: Any) -> str:
    spec = spec.as_dict() if hasattr(spec, "as_dict") else spec  # a YAML config (jsonargparse Namespace)
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return str(spec["class_path"])
    if isinstance(spec, Tensor):
        return f"matrix {tuple(spec.shape)}"
    return getattr(spec, "__name__", type(spec).__name__)  # a class or factory, or a projector module


def as_dfa(spec: DFA | FeedbackEngine | Mapping[str, Any], where: str) -> DFA:
    """A ``DFA`` from a ``DFA`` instance or a mapping of its arguments (``configure_dfa()``'s return)."""
    if isinstance(spec, DFA):
        return spec
    if isinstance(spec, Mapping):
        valid = sorted(DFA(blocks="auto").settings())
        unknown = [key for key in spec if key not in valid]
        if unknown:
            close = {key: difflib.get_close_matches(str(key), valid, n=1) for key in unknown}
            hints = ", ".join(f"{key!r} -> {match[0]!r}" for key, match in close.items() if match)
            raise TypeError(
                f"{where} returned unknown DFA arguments {unknown}"
                + (f" (did you mean {hints}?)" if hints else "")
                + f"; valid arguments: {valid}."
            )
        try:
            return DFA(**spec)
        except TypeError as err:
            raise TypeError(f"{where} returned invalid DFA arguments {sorted(spec)}: {err}") from err
    raise TypeError(
        f"{where} must return a DFA or a dict of its arguments, got {type(spec).__name__}: e.g. "
        "return {'blocks': 'blocks.*', 'output': 'head'}."
    )


def find_dfa(trainer: pl.Trainer) -> FeedbackEngine | None:
    """The DFA engine of a run: the strategy's, or a ``DFA`` among the callbacks; ``None`` without DFA."""
    engine = getattr(trainer.strategy, "dfa", None)
    return engine or next((c for c in trainer.callbacks if isinstance(c, FeedbackEngine)), None)
