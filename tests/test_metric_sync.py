"""The models' validation and test metrics are logged with ``sync_dist``: under DDP, the mean over every rank.

Without it Lightning logs rank 0's value alone (and warns). One process suffices to see how each metric is
logged; ``tests/test_multiprocess_cli.py`` checks a two-rank run prints no such warning.
"""

import lightning.pytorch as pl
import pytest
from conftest import quiet_trainer
from test_vision_models import UNET, VIT

from lightning_dfa.data import DigitsDataModule, ImageDataModule, TextDataModule
from lightning_dfa.models import CausalLM, Diffusion, ImageClassifier, MLPClassifier

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}

MODELS = {
    "mlp": lambda: (MLPClassifier(hidden=8, depth=2), DigitsDataModule(batch_size=16)),
    "vit": lambda: (ImageClassifier(VIT), ImageDataModule("digits", batch_size=16)),
    "ddpm": lambda: (Diffusion(UNET, num_samples=0), ImageDataModule("digits", batch_size=16)),
    "causal_lm": lambda: (CausalLM(config=GPT2), TextDataModule(block_size=16, batch_size=4)),
}


@pytest.mark.parametrize("name", MODELS)
def test_validation_and_test_metrics_are_logged_over_every_rank(name, monkeypatch, tmp_path):
    logged = {}
    original = pl.LightningModule.log

    def log(self, key, value, *args, **kwargs):
        logged[key] = kwargs.get("sync_dist", False)
        return original(self, key, value, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", log)
    model, data = MODELS[name]()
    trainer = quiet_trainer(strategy="dfa", limit_val_batches=1, limit_test_batches=1, default_root_dir=tmp_path)
    trainer.validate(model, datamodule=data, verbose=False)
    trainer.test(model, datamodule=data, verbose=False)
    evaluated = {key: synced for key, synced in logged.items() if key.startswith(("val/", "test/"))}
    assert evaluated and all(evaluated.values()), evaluated
