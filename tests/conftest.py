"""Offline settings before any HF / W&B import, and small models shared by the tests."""

import os
import tempfile

_CACHE = os.path.join(tempfile.gettempdir(), "lightning-dfa-test-cache")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HOME": os.path.join(_CACHE, "hf"),
    "WANDB_DIR": os.path.join(_CACHE, "wandb"),
    "WANDB_CACHE_DIR": os.path.join(_CACHE, "wandb-cache"),
    "WANDB_CONFIG_DIR": os.path.join(_CACHE, "wandb-config"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


class TinyMLP(nn.Module):
    """Blocks of Linear + Tanh and a linear head, as in the exact-gradient references."""

    def __init__(self, widths=(5, 7, 7), classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def capture_grad(module, store, key):
    """Store the gradient that reaches ``module``'s output (hooks registered before attach see the original)."""

    def hook(mod, args, out):
        if out.requires_grad:  # not under no_grad (reference computations)
            out.register_hook(lambda grad: store.__setitem__(key, grad))

    module.register_forward_hook(hook)


@pytest.fixture(autouse=True)
def no_distributed_state_left_behind():
    """A DDP run in this process leaves its default process group initialised and its rendezvous variables
    (MASTER_PORT, LOCAL_RANK, ...) in the environment, which ranks started by a later test would inherit:
    destroy the group and restore the environment after each test."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, generator=generator), torch.tensor([0, 1, 2, 1])


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or model summary (``kwargs`` override).

    The one Trainer factory of the tests: ``quiet_trainer(strategy="dfa", max_steps=2).fit(model, loader)``.
    """
    import lightning.pytorch as pl

    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**options, **kwargs})


def quiet_args(logger: bool = False) -> list[str]:
    """The command-line form of :func:`quiet_trainer` for ``lightning-dfa`` (``logger=True`` keeps the recipe's)."""
    args = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    return args if logger else ["--trainer.logger=false", *args]


def fit_digits(model=None, *, steps: int, hidden: int = 16, batch_size: int = 16, **trainer_kwargs):
    """Train ``model`` (default: ``MLPClassifier(hidden=hidden, depth=2)`` from seed 0) on the digits for ``steps``
    steps with :func:`quiet_trainer` (no validation unless ``trainer_kwargs`` say so); return the trainer."""
    from lightning_dfa.data import DigitsDataModule
    from lightning_dfa.models import MLPClassifier

    if model is None:
        torch.manual_seed(0)
        model = MLPClassifier(hidden=hidden, depth=2)
    trainer = quiet_trainer(**{"max_steps": steps, "limit_val_batches": 0, **trainer_kwargs})
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=batch_size))
    return trainer
