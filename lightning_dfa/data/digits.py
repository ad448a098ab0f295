"""scikit-learn's bundled 8x8 digits (1,797 images), split once with a fixed seed."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from lightning_dfa.data.splits import SplitDataModule


class DigitsDataModule(SplitDataModule):
    """Digits as flat vectors in [0, 1] (``flatten=True``) or ``(1, 8, 8)`` images.

    Stratified train / validation / test split (default 70% / 10% / 20%), the same for every seed
    of the model so that runs are comparable.

    Example::

        dm = DigitsDataModule(batch_size=32)
        Trainer(strategy="dfa").fit(MLPClassifier(), datamodule=dm)
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        flatten: bool = True,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction and test_fraction must be in (0, 1) with a sum below 1, got {val_fraction} and "
                f"{test_fraction}."
            )
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        if not self.hparams.flatten:
            x = x.reshape(-1, 1, 8, 8)
        y = torch.tensor(digits.target, dtype=torch.long)
        hp = self.hparams
        index = torch.arange(len(y))
        rest, test = train_test_split(index, test_size=hp.test_fraction, stratify=y, random_state=hp.split_seed)
        val_share = hp.val_fraction / (1 - hp.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=hp.split_seed)
        self.splits = {
            name: TensorDataset(x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))
        }
