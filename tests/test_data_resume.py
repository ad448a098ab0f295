"""The data modules' training loader resumes exactly: a recipe-like DFA run (``MLPClassifier`` on
``DigitsDataModule``, strategy ``"dfa"``, validation every epoch) killed with SIGKILL in the middle of an
epoch and resumed from its last checkpoint reproduces the uninterrupted run's per-step losses bitwise and
ends with the same weights.

Three forked runs as in tests/test_resume.py (which gives ``fit`` the same loader directly): the reference, a
run that kills itself after step ``KILL_AT`` (checkpoints every ``EVERY`` steps), and its resumption.
Below them, the loader's own behaviour: order from seed and epoch, a state that resumes mid-epoch, a
share per rank.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from resuming import KillAt, StepLog, in_child, losses
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa.data import DigitsDataModule
from lightning_dfa.data.splits import train_loader
from lightning_dfa.models import MLPClassifier

BATCH = 128  # 1,257 training digits: 10 steps per epoch
EPOCHS = 2
EVERY, KILL_AT = 4, 14  # last checkpoint at step 12: epoch 1, batch 2 of 10


def train(
    folder: Path, checkpoints: Path, num_workers: int, kill_at: int | None = None, ckpt_path: str | None = None
) -> None:
    torch.set_num_threads(1)  # the same arithmetic in every run (and no OpenMP pool across fork)
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    callbacks = [StepLog(folder), ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=EVERY, save_last=True)]
    if kill_at is not None:
        callbacks.insert(1, KillAt(kill_at))
    trainer = quiet_trainer(
        strategy="dfa",
        max_epochs=EPOCHS,
        deterministic=True,
        callbacks=callbacks,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    model = MLPClassifier(hidden=32, depth=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=BATCH, num_workers=num_workers), ckpt_path=ckpt_path)


@pytest.fixture(scope="module", params=[0, 2], ids=["no-workers", "2-workers"])
def runs(request, tmp_path_factory) -> dict[str, Any]:
    """The three runs, loading in the main process or in two workers (which prefetch ahead of training)."""
    root, workers = tmp_path_factory.mktemp("data-resume"), request.param
    reference = in_child(train, folder=root / "reference", checkpoints=root / "reference-ckpts", num_workers=workers)
    killed = in_child(train, folder=root / "killed", checkpoints=root / "ckpts", num_workers=workers, kill_at=KILL_AT)
    last = torch.load(root / "ckpts" / "last.ckpt", weights_only=False)
    ckpt_path = str(root / "ckpts" / "last.ckpt")
    resumed = in_child(
        train, folder=root / "resumed", checkpoints=root / "ckpts", num_workers=workers, ckpt_path=ckpt_path
    )
    return {"root": root, "exit": (reference, killed, resumed), "last": last}


@pytest.mark.slow
def test_the_recipe_run_was_killed_after_a_mid_epoch_checkpoint(runs):
    assert runs["exit"] == (0, -signal.SIGKILL, 0)
    assert runs["last"]["global_step"] == KILL_AT // EVERY * EVERY
    (state,) = runs["last"]["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    main = state["_snapshot"]["_main_snapshot"] if "_snapshot" in state else state  # with workers: a snapshot
    assert main["_sampler_iter_state"]["sampler_state"] == {"epoch": 1, "yielded": 2 * BATCH}


@pytest.mark.slow
def test_the_resumed_recipe_run_reproduces_the_per_step_losses_bitwise(runs):
    reference, resumed = losses(runs["root"] / "reference"), losses(runs["root"] / "resumed")
    assert sorted(resumed) == list(range(runs["last"]["global_step"] + 1, EPOCHS * 10 + 1))
    assert resumed == {step: reference[step] for step in resumed}


@pytest.mark.slow
def test_the_resumed_recipe_run_ends_with_the_same_weights(runs):
    reference = torch.load(runs["root"] / "reference" / "weights.pt")
    resumed = torch.load(runs["root"] / "resumed" / "weights.pt")
    assert reference.keys() == resumed.keys()
    for name, weight in reference.items():
        assert torch.equal(resumed[name], weight), name


# ---------------------------------------------------------------------------------------------- the loader itself
def numbers(n: int = 20) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def order(loader: StatefulDataLoader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_the_train_loader_shuffles_from_the_global_seed_and_the_epoch(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    dm = DigitsDataModule()
    first, again = dm.train_dataloader(), dm.train_dataloader()
    assert isinstance(first, StatefulDataLoader) and first.sampler.seed == 5
    epoch0 = torch.cat([y for _, y in first])
    assert torch.equal(torch.cat([y for _, y in again]), epoch0)
    first.sampler.set_epoch(1)
    epoch1 = torch.cat([y for _, y in first])
    assert not torch.equal(epoch1, epoch0) and torch.equal(epoch1.sort().values, epoch0.sort().values)


def test_the_train_loader_state_resumes_mid_epoch_in_its_epoch():
    loader = train_loader(numbers(), batch_size=3)
    loader.sampler.set_epoch(2)
    whole = [batch.tolist() for (batch,) in loader]
    passing = iter(loader)
    seen = [next(passing)[0].tolist() for _ in range(4)]

    restarted = train_loader(numbers(), batch_size=3)
    restarted.load_state_dict(loader.state_dict())  # Lightning sets the epoch only after it has made the iterator
    assert seen + [batch.tolist() for (batch,) in restarted] == whole
    restarted.sampler.set_epoch(3)
    assert len(order(restarted)) == 20, "the next pass is a whole epoch again"


def test_a_train_loader_state_from_an_epochs_end_starts_the_next_epoch_whole():
    loader = train_loader(numbers(), batch_size=3)
    passing = iter(loader)
    for _ in range(len(loader)):  # every batch handed out, the end not yet seen
        next(passing)
    restarted = train_loader(numbers(), batch_size=3)
    restarted.load_state_dict(loader.state_dict())
    loader.sampler.set_epoch(1)
    assert order(restarted) == order(loader)


def test_the_train_loader_gives_each_rank_the_share_of_lightnings_distributed_sampler():
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False)
    dm = DigitsDataModule()
    dm.trainer = trainer
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank) == (2, 0)
    lightning = DistributedSampler(dm.splits["train"], num_replicas=2, rank=0, shuffle=True, seed=sampler.seed)
    assert list(sampler) == list(lightning)


def test_lightning_can_rebuild_the_train_loader_as_overfit_batches_does():
    trainer = quiet_trainer(strategy="dfa", overfit_batches=2, max_epochs=2)
    trainer.fit(MLPClassifier(hidden=8, depth=1), datamodule=DigitsDataModule())
    assert trainer.global_step == 4 and isinstance(trainer.train_dataloader, StatefulDataLoader)
