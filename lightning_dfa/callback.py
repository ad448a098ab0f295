"""``DFA``: a Lightning ``Callback`` that runs a feedback engine, so any strategy can train with DFA."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_dfa.feedback import DFAConfig, FeedbackEngine
from lightning_dfa.loggers import guard_loggers
from lightning_dfa.projectors.registry import check_projector_spec
from lightning_dfa.random_state import random_states, set_random_states

#: Key of the global random states in the callback's checkpoint state.
RANDOM_KEY = "random_states"

#: The metric that counts skipped steps (logged through the LightningModule's loggers with ``nonfinite="skip"``).
SKIPPED_METRIC = "dfa/nonfinite_steps"

_ADVICE = (
    "Lower the learning rate, clip gradients (Trainer(gradient_clip_val=1.0)), check the data for NaN or inf, "
    "use bf16 or fp32 rather than fp16"
)


class DFA(Callback):
    """Direct Feedback Alignment for a LightningModule under any strategy: runs a
    :class:`~lightning_dfa.feedback.FeedbackEngine` (:attr:`engine`) during ``fit``, saves its state in
    checkpoints, and stops (``nonfinite="stop"``) or skips (``"skip"``) a step with a NaN or infinite loss, error
    or gradient.

    Example::

        trainer = Trainer(callbacks=[DFA(blocks="blocks.*", output="head", nonfinite="skip")])
        trainer.callbacks[0].engine.projector   # after fit: the projection, as in plain PyTorch
    """

    def __init__(
        self,
        config: DFAConfig | None = None,
        /,
        *,
        blocks: str | Sequence[str] | None = None,
        output: str | None = None,
        projector: Any = None,
        seed: int | None = None,
        mode: str | None = None,
        error_rows: int | None = None,
        head_lr_scale: float | None = None,
        lr_scale: float | str | None = None,
        lr_scale_ramp: int | None = None,
        backprop_top: int | None = None,
        embeddings: bool | str | None = None,
        spatial_feedback: bool | None = None,
        spatial_patch: int | None = None,
        nonfinite: str | None = None,
        nonfinite_patience: int | None = None,
        strict: bool | None = None,
    ) -> None:
        # The settings given here (None: not given); the rest come from the module's configure_dfa() at setup.
        given = {name: value for name, value in locals().items() if name in DFAConfig.names() and value is not None}
        self._given = DFAConfig.of(config).settings() if config is not None else {}
        self._given.update(given)
        self.engine = FeedbackEngine(DFAConfig(**self._given))
        #: Optimizer steps skipped for non-finite values (kept in checkpoints).
        self.nonfinite_steps = 0
        #: What the last skipped (or stopping) step found, e.g. ``"step 12: the loss is nan"``.
        self.last_nonfinite: str | None = None
        self._consecutive = 0
        self._told_scale = False
        self._losses: list[Tensor] = []  # this step's losses (one per micro-batch), checked at the optimizer step
        self._random_states: dict[str, Any] | None = None  # a checkpoint's, restored when training starts

    @property
    def config(self) -> DFAConfig:
        return self.engine.config

    @property
    def state_key(self) -> str:
        return "lightning_dfa.DFA"

    # ------------------------------------------------------------------ fit lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            config = merged_config(self._given, pl_module)
            if self.engine.model is None and config != self.config:
                self.engine.config = config
            check_projector_spec(self.config.projector)  # a typo fails now, not at the first forward pass
        guard_loggers(trainer)  # a failing logger (W&B down, disk full) warns and is switched off

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After setup() and configure_model(): models may build their layers there.
        engine = self.engine
        if engine.model is not None:
            engine.detach()
        engine.attach(pl_module)
        engine.scale_updates(*trainer.optimizers)  # the optimizers exist now (strategy.setup ran)
        rank_zero_info(_chosen(engine))  # automatic choices must be visible before the run goes far
        engine.projection.defer_nonfinite = True  # a non-finite error is stopped or skipped at the optimizer step
        self._told_scale = False
        self._reset_step()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.engine.model is not None:  # also when fit was interrupted by an exception
            self.engine.detach()
        self.engine.projection.defer_nonfinite = False
        self._reset_step()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.engine.forget_forward()  # a retry after an exception (BatchSizeFinder after out of memory) starts clean

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.engine
        engine.check_routed()
        auto = engine.mode == "dfa" and engine.lr_scale == "auto"  # the frozen control's points do not learn
        if auto and engine.points_lr_scale is not None and not self._told_scale:
            self._told_scale = True  # known from the first error only
            rank_zero_info(f"DFA: lr_scale='auto' set the points' learning rate to {engine.points_lr_scale:.3g} x lr")

    # ------------------------------------------------------------------ non-finite steps
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())  # checked once per optimizer step: no extra device sync here

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        losses, bad_error = self._losses, self.engine.projection.nonfinite_error
        self._reset_step()
        # One float32 sum per tensor, one device sync in all: a NaN or inf entry (or an absurd overflow) shows.
        totals = [_local(t).detach().sum(dtype=torch.float32) for t in [*losses, *(p.grad for p in params)]]
        finite = not totals or bool(torch.stack([t.to(totals[0].device) for t in totals]).isfinite().all())
        if not trainer.strategy.reduce_boolean_decision(bad_error or not finite, all=False):
            self._consecutive = 0
            self._log_count(pl_module)
            return
        causes = self._causes(pl_module, losses, bad_error, params)
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        self.last_nonfinite = f"{where}: {'; '.join(causes)}"
        loss_finite = not any(c.startswith("the loss") for c in causes)
        overflow = loss_finite and getattr(trainer.precision_plugin, "scaler", None) is not None
        if self.config.nonfinite == "stop" and not overflow:
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
        if self._consecutive >= self.config.nonfinite_patience:
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
        causes = [f"the loss is {float(loss)}" for loss in losses if not bool(torch.isfinite(loss).all())][:1]
        if bad_error:
            causes.append(f"the error at the output point {self.engine.output!r} holds NaN or inf")
        names = {p: n for n, p in pl_module.named_parameters()}
        bad = [names.get(p, "?") for p in params if not bool(torch.isfinite(_local(p.grad)).all())]
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            causes.append(f"the gradients of {bad[:5]}{more} hold NaN or inf")
        if not causes:
            causes.append("the gradients overflow (their sums are not finite)")
        return causes

    def _log_count(self, pl_module: pl.LightningModule) -> None:
        if self.config.nonfinite == "skip" or self.nonfinite_steps:
            logger = bool(pl_module.trainer.loggers)
            pl_module.log(SKIPPED_METRIC, float(self.nonfinite_steps), on_step=True, on_epoch=False, logger=logger)

    def _reset_step(self) -> None:
        self._losses, self.engine.projection.nonfinite_error = [], False

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # The global random states too: a resumed run draws (dropout, sampling) exactly as the original did.
        return {**self.engine.state_dict(), "nonfinite_steps": self.nonfinite_steps, RANDOM_KEY: random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.nonfinite_steps = int(state.pop("nonfinite_steps", 0))
        self._random_states = state.pop(RANDOM_KEY, None)
        self.engine.load_state_dict(state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the loaders' iterators are made (which draw from the generators), as when the state was saved.
        if self._random_states is not None:
            set_random_states(self._random_states)
            self._random_states = None


def merged_config(given: Mapping[str, Any], module: pl.LightningModule) -> DFAConfig:
    """The run's DFA settings, per setting: given to ``DFA`` / the strategy, else the module's ``configure_dfa()``,
    else the default."""
    hook = getattr(module, "configure_dfa", None)
    if hook is None:
        return DFAConfig(**given)
    return DFAConfig.of(hook(), f"{type(module).__name__}.configure_dfa()").replace(**given)


def _local(tensor: Tensor) -> Tensor:
    """The local part of a sharded (DTensor) gradient, the values of a sparse one, else the tensor."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.coalesce().values() if tensor.is_sparse else tensor


def _chosen(dfa: FeedbackEngine) -> str:
    """What DFA trains, in one line: ``DFA: 4 feedback points h.0 ... h.3 (auto), error at lm_head (auto), ...``."""
    points, config = dfa.points, dfa.config
    shown = " ".join(points) if len(points) <= 3 else f"{points[0]} ... {points[-1]}"
    line = (
        f"DFA: {len(points)} feedback points {shown}{' (auto)' if config.blocks == 'auto' else ''}, error at "
        f"{dfa.output}{' (auto)' if config.output is None else ''}, projector {_projector_name(config.projector)}"
    )
    if dfa.backprop_points:
        line += f", {len(dfa.backprop_points)} top blocks by backprop"
    head = f"head and embeddings at head_lr_scale={config.head_lr_scale:g} x lr"
    if dfa.mode == "backprop":
        return f"{line}, mode backprop"
    if dfa.mode == "frozen":
        return f"{line}, mode frozen, {head}"
    scale = "auto (min(0.1, head_lr_scale/sqrt(error width)))" if dfa.lr_scale == "auto" else dfa.lr_scale
    return f"{line}, {head}, points at lr_scale={scale} x lr"


def _projector_name(spec: Any) -> str:
    spec = spec.as_dict() if hasattr(spec, "as_dict") else spec  # a YAML config (jsonargparse Namespace)
    if isinstance(spec, Mapping | Tensor):
        return str(spec["class_path"]) if isinstance(spec, Mapping) else f"matrix {tuple(spec.shape)}"
    return spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
