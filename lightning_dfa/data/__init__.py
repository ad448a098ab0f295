"""Data modules with bundled defaults that need no network (imported on first use)."""

from importlib import import_module

_EXPORTS = {
    "DigitsDataModule": "lightning_dfa.data.images",
    "TextDataModule": "lightning_dfa.data.text",
    "ImageDataModule": "lightning_dfa.data.images",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_dfa.data' has no attribute {name!r}")
