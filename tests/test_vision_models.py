"""ImageClassifier (HF ViT) and Diffusion (diffusers UNet2DModel + DDPM): DFA steps, points, checkpoints, samples."""

import pytest
import torch
from conftest import quiet_trainer, tiny_unet, tiny_vit

from lightning_dfa.cli import run
from lightning_dfa.data.images import ImageDataModule
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.models.diffusion import Diffusion
from lightning_dfa.models.image_classifier import ImageClassifier

VIT = {"patch_size": 2, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


@pytest.fixture(scope="module")
def digits():
    return ImageDataModule("digits", batch_size=16)


@pytest.fixture(scope="module")
def symmetric_digits():
    return ImageDataModule("digits", batch_size=16, normalize="symmetric")


def trainer(tmp_path, **kwargs):
    return quiet_trainer(**{"strategy": "dfa", "default_root_dir": str(tmp_path), **kwargs})


def test_vit_takes_its_sizes_from_the_data_and_trains_with_dfa(tmp_path, digits):
    model = ImageClassifier(VIT)
    assert model.model is None  # built when training starts, from the datamodule
    fit = trainer(tmp_path, fast_dev_run=2)
    fit.fit(model, datamodule=digits)
    assert (model.hparams.num_labels, model.hparams.image_size, model.hparams.num_channels) == (10, 8, 1)
    assert fit.strategy.dfa.engine.points == ["model.vit.embeddings", "model.vit.layers.0", "model.vit.layers.1"]
    assert fit.strategy.dfa.engine.output == "model.classifier" and fit.global_step == 2
    assert {"train/loss", "val/loss", "val/acc"} <= set(fit.callback_metrics)
    fit.save_checkpoint(tmp_path / "vit.ckpt")  # the resolved sizes are saved: the same network comes back
    loaded, x = ImageClassifier.load_from_checkpoint(tmp_path / "vit.ckpt"), torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_vit_builds_standalone_and_its_dfa_points_resolve():
    model = ImageClassifier(VIT, num_labels=10, image_size=8, num_channels=1)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    with FeedbackEngine(**model.configure_dfa()).attach(model) as dfa:
        torch.nn.functional.cross_entropy(model(torch.rand(3, 1, 8, 8)), torch.tensor([0, 1, 2])).backward()
        assert dfa.layout["model.vit.layers.1"] == slice(32, 48)  # hidden 16 per point, broadcast over tokens
    assert all(p.grad is not None for p in model.model.vit.layers[0].parameters())


def test_vit_sizes_that_disagree_with_the_data_are_named(tmp_path, digits):
    with pytest.raises(ValueError, match="image_size=16 but the data has image_size=8"):
        trainer(tmp_path, fast_dev_run=1).fit(ImageClassifier({**VIT, "image_size": 16}), datamodule=digits)
    with pytest.raises(ValueError, match="needs num_labels: give it"):
        ImageClassifier(VIT).configure_model()


def test_vit_from_a_local_pretrained_dir(tmp_path):
    tiny_vit().save_pretrained(tmp_path / "vit")
    model = ImageClassifier(pretrained=str(tmp_path / "vit"))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert ImageClassifier(pretrained=str(tmp_path / "vit"), num_labels=3)(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(FileNotFoundError, match="not a local folder with a config.json"):
        ImageClassifier(pretrained=str(tmp_path / "google-vit-base"))


def test_diffusion_trains_with_dfa_and_writes_samples(tmp_path, symmetric_digits):
    model = Diffusion(UNET, num_train_timesteps=100, inference_steps=4, num_samples=4)
    fit = trainer(tmp_path, fast_dev_run=2)
    fit.fit(model, datamodule=symmetric_digits)
    assert fit.strategy.dfa.engine.points == [
        "unet.down_blocks.0",
        "unet.down_blocks.1",
        "unet.mid_block",
        "unet.up_blocks.0",
        "unet.up_blocks.1",
    ]
    assert fit.strategy.dfa.engine.output == "unet.conv_out"
    assert (tmp_path / "samples" / "epoch_000.png").is_file()
    assert {"train/loss", "val/loss"} <= set(fit.callback_metrics)
    assert model.unet.time_embedding.linear_1.weight.grad is None  # cut by the engine (documented)
    fit.save_checkpoint(tmp_path / "ddpm.ckpt")
    loaded, x, t = Diffusion.load_from_checkpoint(tmp_path / "ddpm.ckpt"), torch.rand(2, 1, 8, 8), torch.tensor([1, 9])
    assert torch.equal(loaded.eval()(x, t), model.eval()(x, t))


def test_diffusion_eval_loss_is_deterministic_and_samples_are_seeded():
    model = Diffusion({**UNET, "sample_size": 8, "in_channels": 1}, num_train_timesteps=100, inference_steps=2)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(1)
    first = model.eval_loss(x, batch_idx=0)
    torch.manual_seed(2)  # the global RNG does not matter
    assert torch.equal(first, model.eval_loss(x, batch_idx=0))
    assert not torch.equal(first, model.eval_loss(x, batch_idx=1))
    samples = model.generate(2)
    assert samples.shape == (2, 1, 8, 8) and torch.equal(samples, model.generate(2))


def test_diffusion_from_a_local_pretrained_dir_and_dfa_points(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "unet")
    model = Diffusion(pretrained=str(tmp_path / "unet"), num_train_timesteps=100)
    with FeedbackEngine(**model.configure_dfa()).attach(model) as dfa:
        x = torch.rand(2, 1, 8, 8)
        model.diffusion_loss(x, torch.randn_like(x), torch.tensor([3, 50])).backward()
        assert dfa.points[-1] == "unet.up_blocks.1" and dfa.projector.in_features == 64
    with pytest.raises(FileNotFoundError, match="not a local folder with a config.json"):
        Diffusion(pretrained=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("recipe", ["vit-digits", "ddpm-digits"])
def test_digits_recipes_run_end_to_end(recipe, tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            recipe,
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 1 and cli.trainer.strategy.dfa.engine.mode == "dfa"
    assert "test/loss" in cli.trainer.callback_metrics
