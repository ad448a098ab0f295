"""scikit-learn's bundled 8x8 digits (1,797 images), split once with a fixed seed."""

from __future__ import annotations

from lightning_dfa.data.images import digits
from lightning_dfa.data.splits import SplitDataModule, check_fractions, tensor_splits


class DigitsDataModule(SplitDataModule):
    """Digits as flat vectors in [0, 1] (``flatten=True``) or ``(1, 8, 8)`` images, split 70/10/20 (stratified).

    Example::

        Trainer(strategy="dfa").fit(MLPClassifier(), datamodule=DigitsDataModule(batch_size=32))
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
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        x, y = digits()
        x = x.flatten(1) if hp.flatten else x
        self.splits = tensor_splits(x, y, hp.val_fraction, hp.test_fraction, hp.split_seed)
