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
from torch import nn

from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.projectors import Gaussian
from tests.forking import free_port

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


SETTINGS: dict[str, Any] = {"projector": Float64Gaussian, "seed": 3, "lr_scale": 0.5}


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
