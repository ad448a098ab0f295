"""``ImageClassifier``: HuggingFace ViT image classification, built from a config or a local checkpoint.

DFA points: ``ViTEmbeddings`` and every ``ViTLayer``; the error is the gradient at the logits, one row per image.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_dfa.models.base import (
    Classification,
    DataSized,
    DFAModule,
    built,
    check_config_or_pretrained,
    local_checkpoint,
)

#: Sizes the model takes from the datamodule when they are not given: ViTConfig key -> datamodule reading.
DATA_SIZES = {"num_labels": "classes", "image_size": "image_size", "num_channels": "channels"}


class ImageClassifier(DataSized, DFAModule, Classification):
    """A ``ViTForImageClassification`` (``self.model``) trained with cross-entropy; logs loss and accuracy.

    ``config``: ``ViTConfig`` arguments, or ``pretrained``: a local ``save_pretrained`` folder. ``num_labels``,
    ``image_size`` and ``num_channels`` override ``config``, else come from the datamodule (``configure_model``).

    Example::

        model = ImageClassifier({"patch_size": 2, "hidden_size": 64, "num_hidden_layers": 2})
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        num_labels: int | None = None,
        image_size: int | None = None,
        num_channels: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        dfa: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_config_or_pretrained(config, pretrained, "ViT")
        self.save_hyperparameters()
        self.model = None
        self.data_sizes = DATA_SIZES
        sizes = self._given_sizes()
        if pretrained is not None or all(sizes.get(k) is not None for k in DATA_SIZES):
            self._build(sizes)

    # ------------------------------------------------------------------ building
    def _given_sizes(self) -> dict[str, Any]:
        hp, config = self.hparams, dict(self.hparams.config or {})
        return {key: hp[key] if hp[key] is not None else config.get(key) for key in DATA_SIZES}

    def _build(self, sizes: dict[str, Any]) -> None:
        from transformers import ViTConfig, ViTForImageClassification

        if self.hparams.pretrained is not None:
            path = local_checkpoint(self.hparams.pretrained)
            extra = {"num_labels": sizes["num_labels"], "ignore_mismatched_sizes": True} if sizes["num_labels"] else {}
            self.model = ViTForImageClassification.from_pretrained(path, **extra)
        else:
            config = {**(self.hparams.config or {}), **{k: v for k, v in sizes.items() if v is not None}}
            self.model = ViTForImageClassification(ViTConfig(**config))
        for key in DATA_SIZES:  # resolved sizes go into the checkpoint, so load_from_checkpoint rebuilds the same
            self.hparams[key] = getattr(self.model.config, key)

    def _sizes(self) -> dict[str, Any] | None:
        return {key: getattr(self.model.config, key) for key in DATA_SIZES} if self.model is not None else None

    def dfa_defaults(self) -> dict[str, Any]:
        return {"blocks": "auto", "output": "model.classifier"}

    # ------------------------------------------------------------------ steps
    def forward(self, pixel_values: Tensor) -> Tensor:
        how = (
            "give num_labels, image_size and num_channels, or train it with a datamodule that has num_classes and "
            "image_shape (ImageDataModule)."
        )
        return built(self.model, "ImageClassifier", how)(pixel_values=pixel_values).logits
