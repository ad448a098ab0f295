"""The shared shape of the library's data modules: named splits, one DataLoader recipe, a resumable train loader
(torchdata's ``StatefulDataLoader``: a run resumed mid-epoch trains on the very batches it would have).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from lightning_dfa import _lightning_compat


class EpochSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` whose state also holds its epoch (a loader with workers fetches on
    resume before Lightning sets it); a state taken at an epoch's end resumes at the next epoch's beginning.
    """

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.set_epoch(state["epoch"])
        if self.next_yielded >= self.num_samples:
            self.set_epoch(state["epoch"] + 1)
            self.next_yielded = 0


def train_loader(
    dataset: Dataset, batch_size: int, seed: int = 0, num_workers: int = 0, num_replicas: int = 1, rank: int = 0
) -> StatefulDataLoader:
    """A shuffled, resumable ``StatefulDataLoader``; ``num_replicas``/``rank``: DDP shares. Worker seeds come from
    the loader's own generator: loading never draws from the global random state.
    """
    sampler = EpochSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch 2.10+ deprecates
        warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
        generator = torch.Generator().manual_seed(seed)
        return StatefulDataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=generator
        )


class SplitDataModule(pl.LightningDataModule):
    """A data module whose ``setup`` fills ``self.splits`` (``"train"``, ``"val"``, ``"test"``) and whose hparams
    hold ``batch_size`` and ``num_workers``: :func:`train_loader` for training, plain loaders for the others."""

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str) -> DataLoader:
        if not self.splits:
            self.setup()
        return DataLoader(self.splits[split], batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> StatefulDataLoader:
        if not self.splits:
            self.setup()
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        ranks = _lightning_compat.sampler_ranks(self.trainer) if self.trainer is not None else {}
        return train_loader(self.splits["train"], self.hparams.batch_size, seed, self.hparams.num_workers, **ranks)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Refuse split fractions outside (0, 1) or summing to 1 or more."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction} and "
            f"{test_fraction}."
        )


def tensor_splits(
    x: Tensor, y: Tensor, val_fraction: float, test_fraction: float, seed: int, index: Tensor | None = None
) -> dict[str, TensorDataset]:
    """``{"train", "val", "test"}`` datasets of ``x[index], y[index]`` (default: all), split deterministically and
    stratified by label when every class allows it."""
    index = torch.arange(len(y)) if index is None else index
    rest, test = _split(index, y[index], test_fraction, seed)
    train, val = _split(rest, y[rest], val_fraction / (1 - test_fraction), seed)
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}


def _split(index: Tensor, labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    try:
        a, b = train_test_split(index, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError:  # a class too small to appear in both parts: a plain (still seeded) split
        a, b = train_test_split(index, test_size=fraction, random_state=seed)
    return torch.as_tensor(a), torch.as_tensor(b)
