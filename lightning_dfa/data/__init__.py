"""Data modules with bundled defaults that need no network: digits and other images, text corpora."""

from lightning_dfa.data.images import DigitsDataModule, ImageDataModule
from lightning_dfa.data.text import TextDataModule

__all__ = ["DigitsDataModule", "ImageDataModule", "TextDataModule"]
