"""``Diffusion``: a diffusers ``UNet2DModel`` trained as a DDPM (epsilon prediction, MSE), with samples.

DFA points: the UNet's down, mid and up blocks; the error is the gradient at ``unet.conv_out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dfa.models.base import DataSized, DFAModule, check_config_or_pretrained, local_checkpoint

#: UNet2DModel config keys taken from the datamodule when not given -> datamodule reading.
DATA_SIZES = {"sample_size": "image_size", "in_channels": "channels", "out_channels": "channels"}


class Diffusion(DataSized, DFAModule):
    """DDPM on images in [-1, 1]: ``self.unet`` (``UNet2DModel``) predicts the noise added by ``self.scheduler``.

    ``val/loss`` and ``test/loss`` use noise fixed by ``eval_seed``; every ``sample_every_n_epochs`` validations,
    ``num_samples`` images go to ``<log_dir>/samples/epoch_XXX.png`` (and W&B).

    Example::

        model = Diffusion({"block_out_channels": [32, 64], "norm_num_groups": 8})
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eval_seed: int = 0,
        sample_seed: int = 0,
        num_samples: int = 16,
        inference_steps: int = 100,
        sample_every_n_epochs: int = 1,
        dfa: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_config_or_pretrained(config, pretrained, "UNet2DModel")
        from diffusers import DDPMScheduler

        self.save_hyperparameters()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon"
        )
        self.unet = None
        self.data_sizes = DATA_SIZES
        sizes = self._given_sizes()
        if pretrained is not None or all(v is not None for v in sizes.values()):
            self._build(sizes)

    # ------------------------------------------------------------------ building
    def _given_sizes(self) -> dict[str, Any]:
        config = dict(self.hparams.config or {})
        sizes = {key: config.get(key) for key in DATA_SIZES}
        if sizes["out_channels"] is None and sizes["in_channels"] is not None:
            sizes["out_channels"] = sizes["in_channels"]
        return sizes

    def _build(self, sizes: dict[str, Any]) -> None:
        from diffusers import UNet2DModel

        if self.hparams.pretrained is not None:
            self.unet = UNet2DModel.from_pretrained(local_checkpoint(self.hparams.pretrained))
        else:
            self.unet = UNet2DModel(**{**(self.hparams.config or {}), **sizes})
        self.hparams["config"] = {**(self.hparams.config or {}), **self._sizes()}  # for load_from_checkpoint

    def _sizes(self) -> dict[str, Any] | None:
        if self.unet is None:
            return None
        config = self.unet.config
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        return {"sample_size": size, "in_channels": config.in_channels, "out_channels": config.out_channels}

    def dfa_defaults(self) -> dict[str, Any]:
        return {"blocks": "auto", "output": "unet.conv_out"}

    # ------------------------------------------------------------------ loss
    def forward(self, noisy: Tensor, timesteps: Tensor) -> Tensor:
        if self.unet is None:
            raise RuntimeError(
                "Diffusion is not built yet: give sample_size and in_channels in config, or train it with a "
                "datamodule that has image_shape (ImageDataModule)."
            )
        return self.unet(noisy, timesteps).sample

    def diffusion_loss(self, x: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """MSE between the added noise and the UNet's prediction of it."""
        noisy = self.scheduler.add_noise(x, noise, timesteps)
        return F.mse_loss(self(noisy, timesteps), noise)

    def eval_loss(self, x: Tensor, batch_idx: int) -> Tensor:
        """The loss on noise and timesteps fixed by ``eval_seed`` and ``batch_idx`` (comparable across runs)."""
        generator = torch.Generator().manual_seed(self.hparams.eval_seed * 100_003 + batch_idx)
        noise = torch.randn(x.shape, generator=generator).to(x)
        steps = torch.randint(0, self.hparams.num_train_timesteps, (len(x),), generator=generator).to(x.device)
        return self.diffusion_loss(x, noise, steps)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        noise = torch.randn_like(x)
        steps = torch.randint(0, self.hparams.num_train_timesteps, (len(x),), device=x.device)
        loss = self.diffusion_loss(x, noise, steps)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.eval_loss(batch[0], batch_idx), prog_bar=True, sync_dist=True)  # every rank's

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test/loss", self.eval_loss(batch[0], batch_idx), sync_dist=True)

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def generate(self, num_samples: int | None = None, steps: int | None = None, seed: int | None = None) -> Tensor:
        """``(num_samples, C, H, W)`` images in the data's range, by DDPM ancestral sampling with ``steps`` steps."""
        from diffusers import DDPMScheduler

        hp = self.hparams
        scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps or hp.inference_steps)
        generator = torch.Generator().manual_seed(hp.sample_seed if seed is None else seed)
        sizes = self._sizes()
        shape = (num_samples or hp.num_samples, sizes["in_channels"], sizes["sample_size"], sizes["sample_size"])
        x = torch.randn(shape, generator=generator).to(self.device)
        for t in scheduler.timesteps:
            eps = self(x, t.to(self.device).expand(len(x)))
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        due = (trainer.current_epoch + 1) % self.hparams.sample_every_n_epochs == 0 or trainer.should_stop
        if trainer.sanity_checking or not trainer.is_global_zero or not due or self.hparams.num_samples <= 0:
            return
        was_training = self.training
        self.eval()
        path = self.save_samples(self.generate(), trainer.current_epoch)
        self.train(was_training)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step)

    def save_samples(self, images: Tensor, epoch: int) -> Path:
        """Save ``images`` as a square-ish grid PNG under ``<log_dir>/samples/epoch_XXX.png``."""
        from torchvision.utils import save_image

        datamodule = getattr(self.trainer, "datamodule", None)
        unit = datamodule.denormalize(images) if hasattr(datamodule, "denormalize") else (images + 1) / 2
        unit = unit.clamp(0, 1).float().cpu()
        if unit.shape[-1] < 32:  # tiny images: enlarge (nearest) so the grid is viewable
            unit = F.interpolate(unit, scale_factor=32 // unit.shape[-1], mode="nearest")
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch_{epoch:03d}.png"
        save_image(unit, path, nrow=max(1, int(len(unit) ** 0.5)), padding=2, pad_value=0.5)
        return path
