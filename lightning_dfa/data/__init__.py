"""Data modules with bundled defaults that need no network."""

from lightning_dfa.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
