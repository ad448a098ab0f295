"""The shared shape of the library's data modules: named splits, one DataLoader recipe."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(pl.LightningDataModule):
    """A data module whose ``setup`` fills ``self.splits`` with ``"train"``, ``"val"`` and ``"test"``.

    Subclasses save ``batch_size`` and ``num_workers`` as hyperparameters and implement ``setup``;
    the loaders (shuffled for training) come from here.
    """

    #: The split the test loader reads; text modules test on their held-out validation documents.
    test_split = "test"

    def __init__(self) -> None:
        super().__init__()
        self.splits: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if not self.splits:
            self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split)
