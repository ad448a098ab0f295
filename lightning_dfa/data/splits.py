"""The shared shape of the library's data modules: named splits, one DataLoader recipe, a resumable train loader.

The training loader shuffles from ``seed + epoch`` (``seed``: the one given to ``seed_everything``) and
checkpoints how far into the epoch it is (Lightning saves ``state_dict()`` with the loops and calls
``load_state_dict`` on resume), so a run killed in the middle of an epoch resumes with the very batches
it would have trained on. Under DDP / FSDP it also splits each epoch across the ranks, as Lightning's
own ``DistributedSampler`` would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler``'s order (shuffled from ``seed + epoch``, a share per rank) that can start mid-epoch.

    ``start`` skips the first indices of this rank's share in every pass (:class:`ResumableLoader` sets it
    when it resumes); ``len`` stays the whole share, so Lightning counts the epoch's batches as before.

    Example::

        sampler = EpochSampler(dataset, seed=0)          # one process: the whole dataset, reshuffled every epoch
        sampler.set_epoch(3); sampler.start = 64         # epoch 3 from its 65th index
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler`, with the ``state_dict`` / ``load_state_dict`` Lightning saves.

    The state is ``{"epoch", "batches"}``: the batches this loader has handed out in the epoch (with any
    ``num_workers``: what workers prefetch is not counted). Loaded, the next pass over that same epoch skips
    them; a pass over another epoch (the checkpoint was at an epoch's end) starts at its beginning.

    A pass starts at its first batch, so it reads the epoch Lightning sets after making the iterator (on
    resume, Lightning makes it first). Worker seeds come from the loader's own generator, seeded with
    ``seed + epoch``: loading data never draws from the global random state that a checkpoint restores.

    Example::

        loader = ResumableLoader(dataset, batch_size=32, sampler=EpochSampler(dataset, seed=0))
        state = loader.state_dict()          # {"epoch": 0, "batches": 17} after 17 batches
        loader.load_state_dict(state)        # the next pass of epoch 0 starts at batch 18
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        self._resume: tuple[int, int] | None = None
        self._pass: _Pass | None = None

    def __iter__(self) -> _Pass:
        self._pass = _Pass(self)
        return self._pass

    def _start(self) -> tuple[Iterator[Any], int]:
        """Begin a pass: the batches to skip (on resume, in the checkpoint's epoch), and the DataLoader's iterator."""
        skip = 0
        if isinstance(self.sampler, EpochSampler):
            if self._resume is not None and self._resume[0] == self.sampler.epoch:
                skip = self._resume[1]
            self.sampler.start = skip * self.batch_size
            self.generator.manual_seed(self.sampler.seed + self.sampler.epoch)
        self._resume = None
        return super().__iter__(), skip

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, EpochSampler):  # Lightning swapped the sampler (overfit_batches)
            return {}
        if self._resume is not None:  # loaded, not yet started: still the loaded position
            return {"epoch": self._resume[0], "batches": self._resume[1]}
        if self._pass is None or not self._pass.started:
            return {"epoch": self.sampler.epoch, "batches": 0}
        return {"epoch": self._pass.epoch, "batches": self._pass.skipped + self._pass.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self._resume = (int(state["epoch"]), int(state["batches"]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pass": None}  # a live iterator does not pickle


class _Pass:
    """One pass over a :class:`ResumableLoader`, started at its first batch; counts the batches handed out."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader = loader
        self.started, self.epoch, self.skipped, self.yielded = False, 0, 0, 0
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches, self.skipped = self.loader._start()
            self.epoch, self.started = getattr(self.loader.sampler, "epoch", 0), True
        batch = next(self._batches)
        self.yielded += 1
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_batches": None}


class SplitDataModule(pl.LightningDataModule):
    """A data module whose ``setup`` fills ``self.splits`` with ``"train"``, ``"val"`` and ``"test"``.

    Subclasses save ``batch_size`` and ``num_workers`` as hyperparameters and implement ``setup``;
    the loaders come from here: a :class:`ResumableLoader` for training (shuffled per epoch, split across
    ranks, exact on resume), plain ones in order for validation and test.
    """

    #: The split the test loader reads; text modules test on their held-out validation documents.
    test_split = "test"

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str) -> DataLoader:
        if not self.splits:
            self.setup()
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        if not self.splits:
            self.setup()
        dataset = self.splits["train"]
        sampler = EpochSampler(dataset, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), **self._ranks())
        return ResumableLoader(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split)

    def _ranks(self) -> dict[str, int]:
        """``num_replicas`` and ``rank`` as Lightning's distributed sampler would get them (one process: 1 and 0)."""
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is None or not getattr(connector, "use_distributed_sampler", True):
            return {"num_replicas": 1, "rank": 0}
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return {"num_replicas": kwargs.get("num_replicas", 1), "rank": kwargs.get("rank", 0)}
