"""Data modules with bundled defaults that need no network (imported on first use)."""

from lightning_dfa._lazy import lazy_getattr

_EXPORTS = {
    "DigitsDataModule": "lightning_dfa.data.images",
    "TextDataModule": "lightning_dfa.data.text",
    "ImageDataModule": "lightning_dfa.data.images",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
