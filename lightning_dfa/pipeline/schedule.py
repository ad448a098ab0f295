"""The DFA pipeline schedule: activations flow forward, the last stage broadcasts the error, no gradient flows back.

Example (one rank per stage)::

    groups = pipeline_groups(timeout=60)
    stage_module = split_model(model, num_stages=world, stage_index=rank, config=config)
    stage = PipelineStage(stage_module, rank, world, device, group=groups.p2p)
    schedule = DFASchedule(stage, n_microbatches=4, loss_fn=cross_entropy, config=config, groups=groups)
    optimizer = torch.optim.AdamW(stage_module.parameters()); schedule.scale_updates(optimizer)
    schedule.step(x if rank == 0 else None, target=y)           # x on the first stage, y on the last
    if not schedule.skipped: optimizer.step()
    optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.pipeline import _compat
from lightning_dfa.pipeline.feedback import StageFeedback
from lightning_dfa.pipeline.groups import PipelineGroups
from lightning_dfa.pipeline.split import StageModule, check_pipeline_config

ORDERS = ("1f1b", "gpipe")
_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
_HEADER = 8  # ndim, up to 6 sizes, dtype


class DFASchedule(PipelineScheduleSingle):
    """One stage's part of a DFA pipeline step, in ``order`` ``"1f1b"`` (few stashed microbatches) or ``"gpipe"``.

    Built on torch's ``PipelineScheduleSingle`` with ``loss_fn=None``, so torch's stage allocates no gradient
    buffers and issues no backward op: this schedule owns the loss (last stage), the error broadcast on the
    ``groups.error`` group, each stage's projection of its own columns and its local backward.

    Each microbatch's loss is divided by the number of microbatches (``scale_grads``, as torch's schedules):
    the step's gradient is that of the batch mean. After the step every stage agrees whether every loss, error
    and gradient was finite; if not, ``nonfinite="stop"`` raises ``FloatingPointError`` on every stage, and
    ``"skip"`` clears the gradients and sets :attr:`skipped` on every stage (``nonfinite_patience`` in a row raise).
    """

    def __init__(
        self,
        stage: PipelineStage,
        n_microbatches: int,
        loss_fn: Callable[[Any, Any], Tensor] | None,
        config: DFAConfig | None = None,
        groups: PipelineGroups | None = None,
        *,
        order: str = "1f1b",
        scale_grads: bool = True,
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
        submodule = stage.submod
        if not isinstance(submodule, StageModule):
            raise TypeError(
                f"DFASchedule needs a stage built on split_model's StageModule, got {type(submodule).__name__}: "
                "the schedule gives feedback to the blocks the StageModule records."
            )
        if submodule.is_last and loss_fn is None:
            raise ValueError("The last stage needs loss_fn(output, target): the error is the gradient of the loss.")
        super().__init__(stage, n_microbatches, loss_fn=None, scale_grads=scale_grads)
        self.config = DFAConfig.of(config)
        check_pipeline_config(self.config)
        self.groups = groups
        self.order = order
        self.module = submodule
        self.dfa_loss_fn = loss_fn
        self.feedback = StageFeedback(self.config, submodule.points, groups.error if groups else None)
        #: Whether the last step was skipped (a non-finite loss, error or gradient somewhere, ``nonfinite="skip"``).
        self.skipped = False
        self.skipped_in_a_row = 0
        self._evaluating = False
        #: The error's shape and dtype, sent by the last stage at the first step (then fixed).
        self.error_meta: tuple[torch.Size, torch.dtype] | None = None
        self._input_shapes: list | None = None  # the first step's: torch's stages keep their buffers' sizes
        self._root = self._group_rank_of_last()

    def _group_rank_of_last(self) -> int:
        ranks = self.groups.ranks if self.groups else tuple(range(dist.get_world_size()))
        return ranks[-1]

    def scale_updates(self, optimizer: torch.optim.Optimizer) -> None:
        """This stage's points learn at ``lr_scale`` x the optimizer's rate (``"auto"``: from the error's width)."""
        self.feedback.scale_updates(optimizer, self.module)

    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """A forward-only step (no loss, no broadcast): the last stage returns the merged outputs."""
        self._evaluating = True
        try:
            with torch.no_grad():
                return super().eval(*args, **kwargs)
        finally:
            self._evaluating = False

    # ------------------------------------------------------------------ the step
    def _step_microbatches(
        self,
        arg_mbs: list | None = None,
        kwarg_mbs: list | None = None,
        target_mbs: list | None = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        stage = _compat.stage_of(self)
        arg_mbs, kwarg_mbs = _compat.check_microbatches(self, arg_mbs, kwarg_mbs, target_mbs, losses)
        if stage.is_first:
            self._input_shapes = _check_even(arg_mbs, self._input_shapes)
        if stage.is_last and not self._evaluating:
            if target_mbs is None:
                raise ValueError("The last stage needs target= in step(): the loss is computed there.")
            _check_even([(t,) for t in target_mbs], None)
        _compat.initialize_stage(self, arg_mbs[0], kwarg_mbs[0])
        self.module.take_records()  # shape inference ran the stage once: nothing of it is trained
        if self._evaluating:
            with self._peers(stage.stage_index):
                self._forward_only(stage, arg_mbs, kwarg_mbs)
            return
        run = _Step(self, stage, arg_mbs, kwarg_mbs, target_mbs, return_outputs, loss_kwargs)
        with self._peers(stage.stage_index):
            for kind, index in self.actions(stage.stage_index):
                run.forward(index) if kind == "F" else run.backward(index)
            run.finish()
            if losses is not None and stage.is_last:
                losses[:] = run.losses
            self._agree(run.finite)

    @contextmanager
    def _peers(self, stage_index: int) -> Iterator[None]:
        """A communication that fails because a peer raised, died or went silent: say so, on every other stage."""
        try:
            yield
        except (RuntimeError, dist.DistError) as error:
            if not _peer_failure(error):
                raise
            timeout = self.groups.timeout if self.groups else None
            raise StageFailure(
                f"Pipeline stage {stage_index}: another stage failed or did not answer within the timeout "
                f"({timeout}); its own log says why. Cause: {error}"
            ) from error

    def actions(self, stage_index: int) -> list[tuple[str, int]]:
        """This stage's order of forwards ``("F", i)`` and local backwards ``("B", i)``."""
        count = _compat.microbatch_count(self)
        if self.order == "gpipe":
            return [("F", i) for i in range(count)] + [("B", i) for i in range(count)]
        warmup = min(count, self.module.num_stages - stage_index)
        actions = [("F", i) for i in range(warmup)]
        for i in range(count):
            actions.append(("B", i))
            if warmup + i < count:
                actions.append(("F", warmup + i))
        return actions

    def _forward_only(self, stage: Any, arg_mbs: list, kwarg_mbs: list) -> None:
        sends: list[dict] = []
        for i in range(_compat.microbatch_count(self)):
            _compat.wait_p2p(_compat.batch_p2p(stage.get_fwd_recv_ops(i), desc="fwd_recv"))
            stage.forward_one_chunk(i, arg_mbs[i], kwarg_mbs[i])
            sends.append(_compat.batch_p2p(stage.get_fwd_send_ops(i), desc="fwd_send"))
        for works in sends:
            _compat.wait_p2p(works)

    def _average_over_replicas(self, data: dist.ProcessGroup) -> None:
        """Each replica trained on its share of the batch: the step's gradient is their mean."""
        for param in self.module.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=data)
                param.grad.div_(self.groups.replicas)

    def _agree(self, finite: bool) -> None:
        """Every stage learns whether all were finite (one small all-reduce), and acts on it the same way."""
        flag = torch.tensor([1.0 if finite else 0.0], device=_compat.stage_of(self).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.feedback.group)
        data = self.groups.data if self.groups else None
        if data is not None:  # and every replica: the same decision everywhere
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=data)
        self.skipped = bool(flag.item() == 0.0)
        if not self.skipped:
            self.skipped_in_a_row = 0
            if data is not None:
                self._average_over_replicas(data)
            return
        for param in self.module.parameters():
            param.grad = None
        if self.config.nonfinite == "stop":
            raise FloatingPointError(
                "A loss, error or gradient of this pipeline step is NaN or inf (on some stage); no stage applied the "
                "step. Check the loss and learning rate, or use nonfinite='skip' to skip such steps."
            )
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.config.nonfinite_patience:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} pipeline steps in a row had NaN or inf values (nonfinite_patience="
                f"{self.config.nonfinite_patience}): the run diverged."
            )


class StageFailure(RuntimeError):
    """Another stage of the pipeline raised, died, or did not answer within the groups' timeout."""


def _peer_failure(error: BaseException) -> bool:
    """Whether the communication failed (a peer gone or silent), as gloo and NCCL report it."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        mark in text
        for mark in (
            "Timed out",
            "timed out",
            "Connection reset",
            "Connection closed",
            "Application timeout caused pair",
        )
    )


class _Step:
    """The state of one step on one stage: pending sends, records, errors."""

    def __init__(
        self,
        schedule: DFASchedule,
        stage: Any,
        arg_mbs: list,
        kwarg_mbs: list,
        target_mbs: list | None,
        return_outputs: bool,
        loss_kwargs: dict | None,
    ) -> None:
        self.schedule, self.stage = schedule, stage
        self.arg_mbs, self.kwarg_mbs, self.target_mbs = arg_mbs, kwarg_mbs, target_mbs
        self.return_outputs, self.loss_kwargs = return_outputs, loss_kwargs or {}
        self.count = _compat.microbatch_count(schedule)
        self.records: dict[int, list] = {}
        self.errors: dict[int, Tensor] = {}
        self.sends: dict[int, dict] = {}
        self.broadcasts: list[Any] = []
        self.losses: list[Tensor] = []
        self.finite = True
        self.receives: list[tuple[Tensor, Any]] | None = None  # this step's posted error receives

    def forward(self, i: int) -> None:
        stage, module = self.stage, self.schedule.module
        _compat.wait_p2p(_compat.batch_p2p(stage.get_fwd_recv_ops(i), desc="fwd_recv"))
        output = stage.forward_one_chunk(i, self.arg_mbs[i], self.kwarg_mbs[i], save_forward_output=self.return_outputs)
        self.records[i] = module.take_records()
        self.sends[i] = _compat.batch_p2p(stage.get_fwd_send_ops(i), desc="fwd_send")
        if stage.is_last:
            self._error_of(i, output)

    def _error_of(self, i: int, output: Any) -> None:
        """Last stage: the loss, the head's true-gradient backward, and ``e``, sent to every stage at once."""
        module, schedule = self.schedule.module, self.schedule
        point = module.take_output()
        loss = schedule.dfa_loss_fn(output, self.target_mbs[i], **self.loss_kwargs)
        self.losses.append(loss.detach())
        if schedule.scale_grads:
            loss = loss / self.count
        if point is None:
            raise RuntimeError(f"The output point {module.output!r} did not run, or its output needs no grad.")
        loss.backward()
        if point.grad is None:
            raise RuntimeError(
                f"The loss does not use the output of the error point {module.output!r}: it got no gradient. Set "
                "output= to the module whose output the loss is computed from."
            )
        error = point.grad.detach()
        self.finite &= bool(torch.isfinite(loss.detach()).all())
        meta = (error.shape, error.dtype)
        if self.schedule.error_meta is None:
            self._exchange_header(error, self.records[i])
        elif meta != self.schedule.error_meta:
            raise ValueError(
                f"The error has shape {tuple(error.shape)} ({error.dtype}), at the first step "
                f"{tuple(self.schedule.error_meta[0])} ({self.schedule.error_meta[1]}): the stages receive it in "
                "buffers of the first step's size. Keep the output's shape fixed between steps."
            )
        self.errors[i] = error
        group = self.schedule.feedback.group
        self.broadcasts.append(dist.broadcast(error, src=self.schedule._root, group=group, async_op=True))

    def _exchange_header(self, error: Tensor | None, records: list) -> None:
        """The error's shape and dtype, from the last stage, at the first step; the stages then agree on the layout
        (the same order of collectives on every stage)."""
        header = torch.zeros(_HEADER, dtype=torch.int64, device=self.stage.device)
        if error is not None:
            if error.dim() > _HEADER - 2:
                raise ValueError(f"The error has {error.dim()} dimensions; the pipeline sends at most {_HEADER - 2}.")
            header[0] = error.dim()
            header[1 : 1 + error.dim()] = torch.tensor(error.shape)
            header[-1] = _DTYPES.index(error.dtype)
        dist.broadcast(header, src=self.schedule._root, group=self.schedule.feedback.group)
        ndim = int(header[0])
        shape = torch.Size(header[1 : 1 + ndim].tolist())
        self.schedule.error_meta = (shape, _DTYPES[int(header[-1])])
        feedback = self.schedule.feedback
        if feedback.projection is None:
            feedback.build(feedback.shapes(records, shape), shape, self.stage.device)

    def _receive_error(self, i: int) -> Tensor:
        """The error of microbatch ``i``: every receive of the step is posted at the first, so each lands as soon as
        the last stage sends it."""
        if self.receives is None:
            if self.schedule.error_meta is None:
                self._exchange_header(None, self.records[i])
            shape, dtype = self.schedule.error_meta
            group, root = self.schedule.feedback.group, self.schedule._root
            self.receives = []
            for _ in range(self.count):
                error = torch.empty(shape, dtype=dtype, device=self.stage.device)
                self.receives.append((error, dist.broadcast(error, src=root, group=group, async_op=True)))
        error, work = self.receives[i]
        work.wait()
        return error

    def backward(self, i: int) -> None:
        """The local backward of microbatch ``i``: this stage's columns of ``B e`` into its blocks."""
        error = self.errors.pop(i) if self.stage.is_last else self._receive_error(i)
        records = self.records.pop(i)
        if bool(torch.isfinite(error).all()):  # the same answer on every stage: each checks the same e
            self.schedule.feedback.apply(error, records)
        else:
            self.finite = False
        del records
        _compat.wait_p2p(self.sends.pop(i))
        _compat.release_forward(self.stage, i)

    def finish(self) -> None:
        for works in self.sends.values():
            _compat.wait_p2p(works)
        for work in self.broadcasts:
            work.wait()
        grads = [p.grad for p in self.schedule.module.parameters() if p.grad is not None]
        if grads:  # one device sync for all of them
            self.finite &= bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _check_even(microbatches: list, expected: list | None) -> list:
    """Every microbatch the same shape as the first step's: torch's stages sized their buffers from it."""
    shapes = [tuple(a.shape) for mb in microbatches for a in mb if isinstance(a, Tensor)]
    per_mb = len(shapes) // max(len(microbatches), 1)
    first = shapes[:per_mb]
    if expected is not None and first != expected:
        raise ValueError(
            f"This step's microbatches have shapes {first}, the first step's {expected}: the pipeline's stages keep "
            "the first step's sizes. Use one batch size (DataLoader(drop_last=True)) or pad the last batch."
        )
    for index in range(len(microbatches)):
        got = shapes[index * per_mb : (index + 1) * per_mb]
        if got != first:
            raise ValueError(
                f"Microbatch {index} has shapes {got}, microbatch 0 {first}: the pipeline needs equal microbatches "
                "(a batch size divisible by n_microbatches, the same every step). Drop the last uneven batch "
                "(DataLoader(drop_last=True)) or pad it."
            )
    return first
