"""The DFA pipeline from a Lightning Fabric loop: Fabric launches one process per stage, the schedule drives the step.

Example (every rank runs this; each loads the same batches)::

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_fork")
    fabric.launch()
    pipe = FabricPipeline(fabric, model, cross_entropy, n_microbatches=4, config=DFAConfig(projector="seeded"))
    optimizer = pipe.optimizer(torch.optim.AdamW, lr=1e-3)     # this stage's parameters, both lr scales applied
    for x, y in loader:
        loss = pipe.step(x, y, optimizer)                        # the batch's mean loss, on every rank
    pipe.save("checkpoints/step-100", optimizer)                 # one file per stage, the unsplit model's names
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage

from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.pipeline.checkpoint import load_stage_state_dict, stage_state_dict
from lightning_dfa.pipeline.groups import DEFAULT_TIMEOUT, replicated_groups
from lightning_dfa.pipeline.schedule import DFASchedule
from lightning_dfa.pipeline.split import split_model


class FabricPipeline:
    """This rank's stage of ``model`` on ``fabric.device``, with its :class:`DFASchedule`. Fabric does not wrap the
    model: the stages share nothing but activations, the error and one flag per step.

    ``stages`` (default: every process) below ``fabric.world_size`` makes ``world_size / stages`` data-parallel
    replicas of the pipeline: rank ``r`` is stage ``r % stages`` of replica ``r // stages``, each replica trains
    on its share of every batch and the stages' gradients are averaged over the replicas.
    """

    def __init__(
        self,
        fabric: Any,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        n_microbatches: int,
        config: DFAConfig | None = None,
        *,
        order: str = "1f1b",
        timeout: timedelta | float = DEFAULT_TIMEOUT,
        blocks_per_stage: list[int] | None = None,
        stages: int | None = None,
    ) -> None:
        self.fabric, self.loss_fn, self.config = fabric, loss_fn, DFAConfig.of(config)
        self.stages = stages or fabric.world_size
        self.groups = replicated_groups(self.stages, timeout=timeout)
        self.index = fabric.global_rank % self.stages
        self.module = split_model(model, self.stages, self.index, self.config, blocks_per_stage=blocks_per_stage)
        self.module.to(fabric.device)
        self.stage = PipelineStage(self.module, self.index, self.stages, fabric.device, group=self.groups.p2p)
        self.schedule = DFASchedule(self.stage, n_microbatches, loss_fn, self.config, self.groups, order=order)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.stages - 1

    def optimizer(self, optimizer_class: type[torch.optim.Optimizer], **settings: Any) -> torch.optim.Optimizer:
        """``optimizer_class`` over this stage's parameters: its points at ``lr_scale`` x the rate, the rest at
        ``head_lr_scale`` x."""
        optimizer = optimizer_class(self.module.parameters(), **settings)
        self.schedule.scale_updates(optimizer)
        return optimizer

    def step(self, inputs: Tensor, target: Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One training step on the batch (``inputs`` used by the first stage, ``target`` by the last); the mean
        of the microbatches' losses on every rank (``nan`` for a skipped non-finite step)."""
        losses: list[Tensor] = []
        self.schedule.step(*self._first(inputs), target=self._last(target), losses=losses)
        if not self.schedule.skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = self._share(torch.stack(losses).mean() if losses else None)
        return float("nan") if self.schedule.skipped else loss

    @torch.no_grad()
    def evaluate(self, inputs: Tensor, target: Tensor) -> float:
        """The loss of a batch, forward only (no error, no feedback), on every rank."""
        output = self.schedule.eval(*self._first(inputs))
        return self._share(self.loss_fn(output, self._move(target)) if self.is_last else None)

    def save(self, directory: str | Path, optimizer: torch.optim.Optimizer, **extra: Any) -> Path:
        """``directory/stage-{i}.pt`` for this stage: parameters, optimizer and feedback state, by original names,
        and ``extra`` (the loop's own state: its step, ...)."""
        path = Path(directory) / f"stage-{self.index}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.groups.replica == 0:  # the replicas' copies are equal: one writes, all load it
            torch.save({**stage_state_dict(self.schedule, optimizer), "extra": extra}, path)
        self.fabric.barrier()
        return path

    def load(self, directory: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Resume this stage from :meth:`save`'s file (the same split); returns the ``extra`` saved with it."""
        state = torch.load(Path(directory) / f"stage-{self.index}.pt", map_location="cpu", weights_only=False)
        load_stage_state_dict(self.schedule, optimizer, state)
        return state.get("extra", {})

    def _first(self, inputs: Tensor) -> tuple[Tensor, ...]:
        return (self._move(inputs),) if self.is_first else ()

    def _last(self, target: Tensor) -> Tensor | None:
        return self._move(target) if self.is_last else None

    def _move(self, value: Tensor) -> Tensor:
        """This replica's share of a batch, on this stage's device."""
        replicas = self.groups.replicas
        if len(value) % replicas:
            raise ValueError(f"A batch of {len(value)} does not split into {replicas} equal replica shares.")
        return value.chunk(replicas)[self.groups.replica].to(self.fabric.device)

    def _share(self, loss: Tensor | None) -> float:
        """The last stage's loss on every rank of the replica, averaged over the replicas."""
        value = torch.tensor([float("nan") if loss is None else float(loss)], dtype=torch.float64)
        value = value.to(self.fabric.device)
        torch.distributed.broadcast(value, src=self.groups.ranks[-1], group=self.groups.error)
        if self.groups.data is not None:
            torch.distributed.all_reduce(value, group=self.groups.data)
            value /= self.groups.replicas
        return float(value.item())
