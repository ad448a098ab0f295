"""Shared pieces of the exact-resume tests: per-step loss logs, a self-kill at a step, forked runs."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp

from lightning_dfa.callbacks.common import find_dfa


class StepLog(pl.Callback):
    """Appends ``step loss`` (exact hex) after every step; saves the weights (and feedback state) at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args) -> None:
        with open(self.folder / "losses.txt", "a") as file:
            file.write(f"{trainer.global_step} {outputs['loss'].item().hex()}\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self.folder / "weights.pt")
        torch.save(find_dfa(trainer).state_dict(), self.folder / "feedback.pt")


class KillAt(pl.Callback):
    """SIGKILL this process after global step ``step`` (before that step's checkpoint, if any)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def in_child(train: Callable[..., None], **kwargs: Any) -> int:
    """Run ``train(**kwargs)`` in a forked child; its exit code (``-SIGKILL`` when killed)."""
    child = mp.get_context("fork").Process(target=train, kwargs=kwargs)
    child.start()
    child.join()
    return child.exitcode


def losses(folder: Path) -> dict[int, str]:
    """The per-step losses a :class:`StepLog` wrote."""
    lines = (folder / "losses.txt").read_text().split()
    return {int(step): loss for step, loss in zip(lines[::2], lines[1::2])}
