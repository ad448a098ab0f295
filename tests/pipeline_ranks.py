"""Forked ranks for the pipeline tests: a small float64 MLP, its single-process DFA reference, p2p op counting."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp
from forking import free_port
from torch import nn

from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.projectors import Gaussian

WIDTH, CLASSES, BLOCKS, BATCH = 6, 3, 4, 8


class Float64Gaussian(Gaussian):
    """The dense Gaussian, multiplied in float64: no float32 rounding, so a stage's columns match to 1e-16."""

    def forward(self, error: torch.Tensor) -> torch.Tensor:
        return error.double() @ self.weight.double()


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(BLOCKS)]
    return nn.Sequential(*blocks, nn.Linear(WIDTH, CLASSES)).double()


def batches(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, WIDTH, generator=generator, dtype=torch.float64),
            torch.randint(0, CLASSES, (BATCH,), generator=generator),
        )
        for _ in range(steps)
    ]


SETTINGS: dict[str, Any] = {"projector": Float64Gaussian, "seed": 3, "lr_scale": "auto"}


def reference(steps: int, microbatches: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Single-process DFA: the engine, the same microbatches (loss / M each), SGD."""
    model = mlp()
    engine = FeedbackEngine(**(settings or SETTINGS)).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine.scale_updates(optimizer)
    first_grads = {}
    for step, (x, y) in enumerate(batches(steps)):
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            (nn.functional.cross_entropy(model(xm), ym) / microbatches).backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return {"grads": first_grads, "params": {n: p.detach().clone() for n, p in model.state_dict().items()}}


class P2PCounter:
    """Every point-to-point op this process issues, as (``"send"`` or ``"recv"``, peer global rank)."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, int]] = []
        self.counting = False
        self._originals = {name: getattr(c10d, name) for name in ("isend", "irecv", "send", "recv")}

    def install(self) -> None:
        for name, original in self._originals.items():
            wrapped = self._wrap(name, original)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)

    def _wrap(self, name: str, original: Callable) -> Callable:
        kind = "send" if "send" in name else "recv"

        def op(tensor, *args, **kwargs):
            if self.counting:
                group, peer = kwargs.get("group"), kwargs.get("group_dst", kwargs.get("group_src"))
                if peer is not None:
                    peer = dist.get_global_rank(group, peer) if group is not None else peer
                else:
                    peer = args[0] if args else kwargs.get("dst", kwargs.get("src"))
                self.ops.append((kind, int(peer)))
            return original(tensor, *args, **kwargs)

        return op


def init_rank(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def spawn(target: Callable[..., None], args: tuple, world: int, deadline_s: float = 120) -> list[int | None]:
    """``target(rank, world, port, *args)`` in ``world`` forked processes (at most 4); their exit codes."""
    assert world <= 4
    port = free_port()
    context = mp.start_processes(target, args=(world, port, *args), nprocs=world, start_method="fork", join=False)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(p.is_alive() for p in context.processes):
        time.sleep(0.1)
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join()
    return [p.exitcode for p in context.processes]


PROJECTORS = ("gaussian", "seeded", "structured", "opu")
CONFIGS = [(p, m, order) for p in (1, 2, 3, 4) for m in (1, 4) for order in ("1f1b", "gpipe")]


def run_stage(
    rank: int,
    stages: int,
    microbatches: int,
    order: str,
    steps: int,
    groups: Any,
    settings: dict[str, Any] | None = None,
    counter: P2PCounter | None = None,
) -> dict[str, Any]:
    """Train this rank's stage of :func:`mlp` for ``steps`` pipeline steps; its first gradients and parameters."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_dfa.feedback import DFAConfig
    from lightning_dfa.pipeline import DFASchedule, split_model

    config = DFAConfig(**(settings or SETTINGS))
    module = split_model(mlp(), stages, rank, config)
    stage = PipelineStage(module, rank, stages, torch.device("cpu"), group=groups.p2p)
    schedule = DFASchedule(stage, microbatches, nn.functional.cross_entropy, config, groups, order=order)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    schedule.scale_updates(optimizer)
    grads: dict[str, torch.Tensor] = {}
    for step, (x, y) in enumerate(batches(steps)):
        if counter is not None:
            counter.counting = step > 0  # the first step also warms up the links (torch's vote goes both ways)
        schedule.step(*((x,) if rank == 0 else ()), target=y if rank == stages - 1 else None)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        if not schedule.skipped:
            optimizer.step()
        optimizer.zero_grad()
    if counter is not None:
        counter.counting = False
    return {"grads": grads, "params": {n: t.clone() for n, t in module.state_dict().items()}}


def exactness_worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    """Every configuration in turn on the first ``P`` ranks; the others only join the groups' creation."""
    from lightning_dfa.pipeline import pipeline_groups

    init_rank(rank, world, port)
    counter = P2PCounter()
    counter.install()
    results = {}
    for stages, microbatches, order in CONFIGS:
        groups = pipeline_groups(list(range(stages)), timeout=30)
        if rank < stages:
            counter.ops.clear()
            result = run_stage(rank, stages, microbatches, order, steps, groups, counter=counter)
            result["p2p"] = list(counter.ops)
            results[(stages, microbatches, order)] = result
        dist.barrier()
    for projector in PROJECTORS:  # the library's own projectors, 2 stages, 2 microbatches
        groups = pipeline_groups([0, 1], timeout=30)
        if rank < 2:
            results[("projector", projector)] = run_stage(
                rank, 2, 2, "1f1b", steps, groups, {**SETTINGS, "projector": projector}
            )
        dist.barrier()
    results[("torch-1f1b", 2, 4)] = torch_backprop_p2p(rank, counter) if rank < 2 else None
    dist.barrier()
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def torch_backprop_p2p(rank: int, counter: P2PCounter) -> dict[str, Any]:
    """torch's own Schedule1F1B (backprop) on the same 2-stage split: the counter sees its gradient sends."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from lightning_dfa.pipeline import pipeline_groups, split_model

    groups = pipeline_groups([0, 1], timeout=30)
    module = split_model(mlp(), 2, rank)
    stage = PipelineStage(_Plain(module), rank, 2, torch.device("cpu"), group=groups.p2p)
    schedule = Schedule1F1B(stage, 4, loss_fn=nn.functional.cross_entropy)
    for step, (x, y) in enumerate(batches(2)):
        counter.ops.clear() if step == 1 else None
        counter.counting = step == 1
        schedule.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    counter.counting = False
    return {"p2p": list(counter.ops)}


class _Plain(nn.Module):
    """A stage's modules run as plain backprop (for the torch-schedule comparison)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stage = self.stage
        hidden = stage.chain.embed(stage, x) if stage.is_first else x
        for name in stage.points:
            hidden = stage.get_submodule(name)(hidden)
        return stage.chain.head(stage, hidden) if stage.is_last else hidden


def build(rank: int, stages: int, groups: Any, settings: dict[str, Any] | None = None, microbatches: int = 2):
    """This rank's stage module, schedule and optimizer for :func:`mlp`."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_dfa.feedback import DFAConfig
    from lightning_dfa.pipeline import DFASchedule, split_model

    config = DFAConfig(**(settings or SETTINGS))
    module = split_model(mlp(), stages, rank, config)
    stage = PipelineStage(module, rank, stages, torch.device("cpu"), group=groups.p2p)
    schedule = DFASchedule(stage, microbatches, nn.functional.cross_entropy, config, groups)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    schedule.scale_updates(optimizer)
    return module, schedule, optimizer


def train(rank: int, stages: int, schedule: Any, optimizer: Any, data: list) -> list[bool]:
    skipped = []
    for x, y in data:
        schedule.step(*((x,) if rank == 0 else ()), target=y if rank == stages - 1 else None)
        skipped.append(schedule.skipped)
        if not schedule.skipped:
            optimizer.step()
        optimizer.zero_grad()
    return skipped


def nonfinite_worker(rank: int, world: int, port: int, out: str) -> None:
    """A NaN input at step 1: with "skip" every stage skips it; with "stop" every stage raises."""
    from lightning_dfa.pipeline import pipeline_groups

    init_rank(rank, world, port)
    data = batches(3)
    data[1] = (data[1][0].clone().fill_(float("nan")), data[1][1])
    result: dict[str, Any] = {}
    groups = pipeline_groups(timeout=30)
    module, schedule, optimizer = build(rank, world, groups, {**SETTINGS, "nonfinite": "skip"})
    train(rank, world, schedule, optimizer, data[:1])
    before = {n: t.clone() for n, t in module.state_dict().items()}
    result["skipped"] = train(rank, world, schedule, optimizer, data[1:2])
    result["unchanged"] = all(torch.equal(before[n], t) for n, t in module.state_dict().items())
    result["grads_cleared"] = all(p.grad is None for p in module.parameters())
    result["skipped"] += train(rank, world, schedule, optimizer, data[2:])
    module, schedule, optimizer = build(rank, world, groups, {**SETTINGS, "nonfinite": "stop"})
    try:
        train(rank, world, schedule, optimizer, data[:2])
        result["stop"] = None
    except FloatingPointError as error:
        result["stop"] = str(error)
    dist.barrier()
    torch.save(result, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def failing_worker(rank: int, world: int, port: int, out: str, how: str, timeout_s: float) -> None:
    """The last rank raises (or stops answering) in step 1; the others must raise within the timeout."""
    from lightning_dfa.pipeline import pipeline_groups

    init_rank(rank, world, port, timeout_s=600)  # the default group's timeout does not reach new groups on gloo
    groups = pipeline_groups(timeout=timeout_s)
    module, schedule, optimizer = build(rank, world, groups)
    data = batches(2)
    train(rank, world, schedule, optimizer, data[:1])
    started = time.monotonic()
    if rank == world - 1:
        if how == "raise":
            raise RuntimeError("this stage failed")
        deadline = time.monotonic() + timeout_s * 10  # silent: alive, its sockets open, until the others have raised
        while time.monotonic() < deadline and not os.path.exists(f"{out}/0.pt"):
            time.sleep(0.1)
        time.sleep(0.5)
        os._exit(3)
    try:
        train(rank, world, schedule, optimizer, data[1:])
        outcome = "no error"
    except Exception as error:  # noqa: BLE001 - what the peers raise is what is tested
        outcome = f"{type(error).__name__}: {error}"
    torch.save({"outcome": outcome, "seconds": time.monotonic() - started}, f"{out}/{rank}.pt")
    os._exit(0)  # the process group cannot be torn down with a dead peer


def checkpoint_worker(rank: int, world: int, port: int, out: str, first: int, then: int, resume: bool) -> None:
    """``first`` steps, save every stage; or (``resume``) load them and train ``then`` more steps."""
    from lightning_dfa.pipeline import pipeline_groups
    from lightning_dfa.pipeline.checkpoint import load_stage_state_dict, stage_state_dict

    init_rank(rank, world, port)
    groups = pipeline_groups(timeout=30)
    module, schedule, optimizer = build(rank, world, groups)
    data = batches(first + then)
    if resume:
        load_stage_state_dict(schedule, optimizer, torch.load(f"{out}/stage-{rank}.pt", weights_only=False))
        train(rank, world, schedule, optimizer, data[first:])
        torch.save(module.state_dict(), f"{out}/resumed-{rank}.pt")
    else:
        train(rank, world, schedule, optimizer, data[:first])
        torch.save(stage_state_dict(schedule, optimizer), f"{out}/stage-{rank}.pt")
        train(rank, world, schedule, optimizer, data[first:])
        torch.save(module.state_dict(), f"{out}/straight-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def uneven_worker(rank: int, world: int, port: int, out: str) -> None:
    """A batch of 7 in 2 microbatches, then a smaller batch: both are refused with the fix."""
    from lightning_dfa.pipeline import pipeline_groups

    init_rank(rank, world, port)
    module, schedule, optimizer = build(rank, world, pipeline_groups(timeout=30))
    (x, y), messages = batches(1)[0], []
    for inputs, target in ((x[:7], y[:7]), (x, y), (x[:4], y[:4])):
        try:
            schedule.step(inputs, target=target)
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    torch.save(messages, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def frozen_worker(rank: int, world: int, port: int, out: str) -> None:
    """A frozen block on a stage gets no backward (as in one process); the others train."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_dfa.feedback import DFAConfig
    from lightning_dfa.pipeline import DFASchedule, pipeline_groups, split_model

    init_rank(rank, world, port)
    groups = pipeline_groups(timeout=30)
    model = mlp()
    model[1].requires_grad_(False)
    config = DFAConfig(**SETTINGS)
    module = split_model(model, world, rank, config)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), group=groups.p2p)
    schedule = DFASchedule(stage, 2, nn.functional.cross_entropy, config, groups)
    x, y = batches(1)[0]
    schedule.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
    torch.save({n: p.grad is not None for n, p in module.named_parameters()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def replicas_worker(rank: int, world: int, port: int, out: str, steps: int) -> None:
    """2 replicas of a 2-stage pipeline, each on its half of every batch in 2 microbatches."""
    from torch.distributed.pipelining import PipelineStage

    from lightning_dfa.feedback import DFAConfig
    from lightning_dfa.pipeline import DFASchedule, replicated_groups, split_model

    init_rank(rank, world, port)
    groups = replicated_groups(stages=2, timeout=30)
    index, share = rank % 2, slice(groups.replica * BATCH // 2, (groups.replica + 1) * BATCH // 2)
    config = DFAConfig(**SETTINGS)
    module = split_model(mlp(), 2, index, config)
    stage = PipelineStage(module, index, 2, torch.device("cpu"), group=groups.p2p)
    schedule = DFASchedule(stage, 2, nn.functional.cross_entropy, config, groups)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    schedule.scale_updates(optimizer)
    for x, y in batches(steps):
        schedule.step(*((x[share],) if index == 0 else ()), target=y[share] if index == 1 else None)
        optimizer.step()
        optimizer.zero_grad()
    torch.save(module.state_dict(), f"{out}/{rank}.pt")
    dist.destroy_process_group()
