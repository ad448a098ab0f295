"""Exact resume: a DFA run killed with SIGKILL in the middle of an epoch and resumed from its last checkpoint
reproduces the uninterrupted run step for step, bitwise, on CPU.

Three forked runs of the same deterministic recipe (a small MLP with dropout, a shuffled loader, the OPU
emulator as projector, whose camera noise follows a call counter): the uninterrupted reference; a run that
kills itself with SIGKILL after step ``KILL_AT`` (checkpoints every ``EVERY`` steps, so the last one is
mid-epoch); and its resumption from ``last.ckpt``. Each writes its per-step losses as exact hex floats.

What makes it exact:
- the DFA strategy saves and restores the global RNG states (dropout goes on with the same masks);
- the feedback state (seed, layout, projector state, OPU call counter) is in the checkpoint;
- the loader is resumable (``state_dict``/``load_state_dict``, which Lightning saves and restores): it shuffles
  from ``seed + epoch`` and starts mid-epoch where the checkpoint left off. A plain ``DataLoader(shuffle=True)``
  restarts its epoch from the first batch after a mid-epoch resume (Lightning warns about it).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFAStrategy
from lightning_dfa.models import MLPClassifier
from lightning_dfa.strategies import RNG_KEY, rng_states, set_rng_states

SAMPLES, BATCH = 40, 4  # 10 steps per epoch
EPOCHS = 3
EVERY, KILL_AT = 4, 18  # last checkpoint at step 16: epoch 1, batch 6 of 10


class EpochSampler(Sampler[int]):
    """Shuffles from ``seed + epoch`` (Lightning calls ``set_epoch``) and can start mid-epoch.

    Example::

        sampler = EpochSampler(len(dataset), seed=0)
        sampler.set_epoch(1); sampler.resume(epoch=1, start=24)   # the next pass yields the last 16 indices
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.yielded = 0  # indices handed out in this epoch, counting those skipped on resume
        self._resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, start: int) -> None:
        self._resume_at = (epoch, start)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        resume, self._resume_at = self._resume_at, None
        self.yielded = resume[1] if resume is not None and resume[0] == self.epoch else 0
        for index in order[self.yielded :]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.size


class ResumableLoader(DataLoader):
    """A shuffled ``DataLoader`` with the ``state_dict``/``load_state_dict`` that Lightning checkpoints.

    Exact with ``num_workers=0``: the sampler has then handed out exactly the indices of the batches trained
    on (a sized loader is not prefetched by Lightning).
    """

    def __init__(self, dataset: TensorDataset, batch_size: int, seed: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "start": self.sampler.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["start"])


class DropoutMLP(MLPClassifier):
    """The library's MLP with dropout after each block: resuming must also continue the global RNG."""

    def __init__(self) -> None:
        super().__init__(in_features=8, hidden=16, depth=2, num_classes=3, lr=0.01)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = self.drop(block(x))
        return self.head(x)


class StepLog(pl.Callback):
    """Appends ``step loss`` (exact hex) after every step and the final feedback state and weights at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args) -> None:
        with open(self.folder / "losses.txt", "a") as file:
            file.write(f"{trainer.global_step} {outputs['loss'].item().hex()}\n")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(pl_module.state_dict(), self.folder / "weights.pt")
        torch.save(trainer.strategy.dfa.state_dict(), self.folder / "feedback.pt")


class KillAt(pl.Callback):
    """SIGKILL this process after global step ``step`` (before that step's checkpoint, if any)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(SAMPLES, 8, generator=generator), torch.randint(0, 3, (SAMPLES,), generator=generator)
    )


def train(folder: Path, checkpoints: Path, kill_at: int | None = None, ckpt_path: str | None = None) -> None:
    """One run of the recipe; losses, weights and feedback state go to ``folder``."""
    torch.set_num_threads(1)  # the same arithmetic in every run (and no OpenMP pool across fork)
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    callbacks = [StepLog(folder), ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=EVERY, save_last=True)]
    if kill_at is not None:
        callbacks.insert(1, KillAt(kill_at))
    trainer = pl.Trainer(
        strategy=DFAStrategy(projector="opu", seed=0),
        accelerator="cpu",
        max_epochs=EPOCHS,
        deterministic=True,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(DropoutMLP(), ResumableLoader(dataset(), BATCH), ckpt_path=ckpt_path)


def in_child(**kwargs: Any) -> int:
    """Run :func:`train` in a forked child; its exit code (``-SIGKILL`` when killed)."""
    child = mp.get_context("fork").Process(target=train, kwargs=kwargs)
    child.start()
    child.join()
    return child.exitcode


def losses(folder: Path) -> dict[int, str]:
    lines = (folder / "losses.txt").read_text().split()
    return {int(step): loss for step, loss in zip(lines[::2], lines[1::2])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume")
    reference = in_child(folder=root / "reference", checkpoints=root / "reference-ckpts")
    killed = in_child(folder=root / "killed", checkpoints=root / "ckpts", kill_at=KILL_AT)
    last = torch.load(root / "ckpts" / "last.ckpt", weights_only=False)
    resumed = in_child(folder=root / "resumed", checkpoints=root / "ckpts", ckpt_path=str(root / "ckpts" / "last.ckpt"))
    return {"root": root, "exit": (reference, killed, resumed), "last": last}


def test_the_killed_run_died_by_sigkill_after_a_mid_epoch_checkpoint(runs):
    assert runs["exit"] == (0, -signal.SIGKILL, 0)
    assert runs["last"]["global_step"] == KILL_AT // EVERY * EVERY
    assert runs["last"]["global_step"] % (SAMPLES // BATCH) != 0, "the checkpoint is in the middle of an epoch"


def test_resumed_run_reproduces_the_per_step_losses_bitwise(runs):
    reference, resumed = losses(runs["root"] / "reference"), losses(runs["root"] / "resumed")
    first = runs["last"]["global_step"] + 1
    assert sorted(resumed) == list(range(first, EPOCHS * SAMPLES // BATCH + 1))
    assert resumed == {step: reference[step] for step in resumed}


def test_resumed_run_ends_with_the_same_weights(runs):
    reference = torch.load(runs["root"] / "reference" / "weights.pt")
    resumed = torch.load(runs["root"] / "resumed" / "weights.pt")
    assert reference.keys() == resumed.keys()
    for name, weight in reference.items():
        assert torch.equal(resumed[name], weight), name


def test_checkpoint_holds_the_feedback_state(runs):
    feedback = runs["last"]["callbacks"]["lightning_dfa.DFA"]
    assert feedback["seed"] == 0 and set(feedback["layout"]) == {"blocks.0", "blocks.1"}
    assert feedback["projector"]["_extra_state"]["calls"] == runs["last"]["global_step"]


def test_resumed_run_ends_with_the_same_feedback_state(runs):
    reference = torch.load(runs["root"] / "reference" / "feedback.pt", weights_only=False)
    resumed = torch.load(runs["root"] / "resumed" / "feedback.pt", weights_only=False)
    assert resumed["layout"] == reference["layout"]
    assert resumed["projector"]["_extra_state"] == reference["projector"]["_extra_state"]


def test_checkpoint_holds_the_global_random_states(runs):
    assert set(runs["last"][RNG_KEY]) == {"torch", "cuda", "numpy", "python"}


def test_random_states_survive_a_weights_only_load(tmp_path):
    torch.save(rng_states(), tmp_path / "rng.pt")
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    torch.testing.assert_close(torch.rand(3), draws[0], rtol=0, atol=0)
    assert (np.random.rand(3) == draws[1]).all() and random.random() == draws[2]
