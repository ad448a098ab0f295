"""Forked CPU ranks for the distributed tests: a free port, torchrun's variables, and a deadline."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_env(rank: int, port: int, world: int = WORLD) -> None:
    """What torchrun sets (Lightning then joins the process group instead of launching processes), in a forked rank.

    OpenMP's thread pool does not survive fork: a forked child that enters a parallel region the parent already
    used hangs. One intra-op thread keeps ATen out of OpenMP (Lightning's own fork launcher does the same).
    """
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        LOCAL_WORLD_SIZE=str(world),
    )


def run_ranks(target: Callable[..., None], args: tuple[Any, ...], deadline_s: float) -> list[int | None]:
    """Run ``target(rank, *args)`` in ``WORLD`` forked processes; their exit codes (killed at the deadline)."""
    context = mp.start_processes(target, args=args, nprocs=WORLD, start_method="fork", join=False)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(p.is_alive() for p in context.processes):
        time.sleep(0.2)
    for process in context.processes:
        if process.is_alive():
            process.kill()
        process.join()
    return [p.exitcode for p in context.processes]
