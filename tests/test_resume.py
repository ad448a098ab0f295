"""Exact resume: a DFA run killed with SIGKILL in the middle of an epoch and resumed from its last checkpoint
reproduces the uninterrupted run step for step, bitwise, on CPU.

Three forked runs of the same deterministic recipe (a small MLP with dropout, a shuffled loader, the OPU
emulator as projector, whose camera noise follows a call counter): the uninterrupted reference; a run that
kills itself with SIGKILL after step ``KILL_AT`` (checkpoints every ``EVERY`` steps, so the last one is
mid-epoch); and its resumption from ``last.ckpt``. Each writes its per-step losses as exact hex floats.

What makes it exact:
- the DFA callback (the strategy's, or one given under another strategy) saves and restores the global random
  states (dropout goes on with the same masks);
- the feedback state (seed, layout, projector state, OPU call counter) is in the checkpoint;
- the loader is resumable (``state_dict``/``load_state_dict``, which Lightning saves and restores): it shuffles
  from ``seed + epoch`` and starts mid-epoch where the checkpoint left off. A plain ``DataLoader(shuffle=True)``
  restarts its epoch from the first batch after a mid-epoch resume (Lightning warns about it).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from resuming import KillAt, StepLog, in_child, losses
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFA, DFAStrategy
from lightning_dfa.callback import RANDOM_KEY
from lightning_dfa.data.splits import train_loader
from lightning_dfa.models import MLPClassifier
from lightning_dfa.random_state import random_states, set_random_states

SAMPLES, BATCH = 40, 4  # 10 steps per epoch
EPOCHS = 3
EVERY, KILL_AT = 4, 18  # last checkpoint at step 16: epoch 1, batch 6 of 10


class DropoutMLP(MLPClassifier):
    """The library's MLP with dropout after each block: resuming must also continue the global RNG."""

    def __init__(self) -> None:
        super().__init__(in_features=8, hidden=16, depth=2, num_classes=3, lr=0.01)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = self.drop(block(x))
        return self.head(x)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(SAMPLES, 8, generator=generator), torch.randint(0, 3, (SAMPLES,), generator=generator)
    )


def train(folder: Path, checkpoints: Path, form: str, kill_at: int | None = None, ckpt_path: str | None = None) -> None:
    """One run of the recipe (``form``: DFA as the strategy or as a callback); losses, weights and feedback state
    go to ``folder``."""
    torch.set_num_threads(1)  # the same arithmetic in every run (and no OpenMP pool across fork)
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    callbacks = [StepLog(folder), ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=EVERY, save_last=True)]
    if kill_at is not None:
        callbacks.insert(1, KillAt(kill_at))
    if form == "callback":
        callbacks.insert(0, DFA(projector="opu", seed=0))
    trainer = quiet_trainer(
        strategy=DFAStrategy(projector="opu", seed=0) if form == "strategy" else "auto",
        max_epochs=EPOCHS,
        deterministic=True,
        callbacks=callbacks,
        enable_checkpointing=True,
        limit_val_batches=0,
    )
    data = dataset()
    trainer.fit(DropoutMLP(), train_loader(data, batch_size=BATCH, seed=0), ckpt_path=ckpt_path)


@pytest.fixture(scope="module", params=["strategy", "callback"])
def runs(tmp_path_factory, request) -> dict[str, Any]:
    root, form = tmp_path_factory.mktemp(f"resume-{request.param}"), request.param
    reference = in_child(train, folder=root / "reference", checkpoints=root / "reference-ckpts", form=form)
    killed = in_child(train, folder=root / "killed", checkpoints=root / "ckpts", form=form, kill_at=KILL_AT)
    last = torch.load(root / "ckpts" / "last.ckpt", weights_only=False)
    resumed = in_child(
        train,
        folder=root / "resumed",
        checkpoints=root / "ckpts",
        form=form,
        ckpt_path=str(root / "ckpts" / "last.ckpt"),
    )
    return {"root": root, "exit": (reference, killed, resumed), "last": last}


@pytest.mark.slow
def test_the_killed_run_died_by_sigkill_after_a_mid_epoch_checkpoint(runs):
    assert runs["exit"] == (0, -signal.SIGKILL, 0)
    assert runs["last"]["global_step"] == KILL_AT // EVERY * EVERY
    assert runs["last"]["global_step"] % (SAMPLES // BATCH) != 0, "the checkpoint is in the middle of an epoch"


@pytest.mark.slow
def test_resumed_run_reproduces_the_per_step_losses_bitwise(runs):
    reference, resumed = losses(runs["root"] / "reference"), losses(runs["root"] / "resumed")
    first = runs["last"]["global_step"] + 1
    assert sorted(resumed) == list(range(first, EPOCHS * SAMPLES // BATCH + 1))
    assert resumed == {step: reference[step] for step in resumed}


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(runs):
    reference = torch.load(runs["root"] / "reference" / "weights.pt")
    resumed = torch.load(runs["root"] / "resumed" / "weights.pt")
    assert reference.keys() == resumed.keys()
    for name, weight in reference.items():
        assert torch.equal(resumed[name], weight), name


@pytest.mark.slow
def test_checkpoint_holds_the_feedback_state(runs):
    feedback = runs["last"]["callbacks"]["lightning_dfa.DFA"]
    assert feedback["seed"] == 0 and set(feedback["layout"]) == {"blocks.0", "blocks.1"}
    assert feedback["projector"]["_extra_state"]["calls"] == runs["last"]["global_step"]


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_feedback_state(runs):
    reference = torch.load(runs["root"] / "reference" / "feedback.pt", weights_only=False)
    resumed = torch.load(runs["root"] / "resumed" / "feedback.pt", weights_only=False)
    assert resumed["layout"] == reference["layout"]
    assert resumed["projector"]["_extra_state"] == reference["projector"]["_extra_state"]


@pytest.mark.slow
def test_checkpoint_holds_the_global_random_states(runs):
    states = runs["last"]["callbacks"]["lightning_dfa.DFA"][RANDOM_KEY]
    assert set(states) == {"torch", "cuda", "numpy", "python"}


def test_random_states_survive_a_weights_only_load(tmp_path):
    torch.save(random_states(), tmp_path / "rng.pt")
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_random_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    torch.testing.assert_close(torch.rand(3), draws[0], rtol=0, atol=0)
    assert (np.random.rand(3) == draws[1]).all() and random.random() == draws[2]
