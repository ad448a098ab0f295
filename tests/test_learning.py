"""Learning, fast: on every recipe family DFA beats the frozen-blocks control, which never moves its blocks.

Each test trains a small model of the family for a few dozen steps from one seed, once with DFA (the
plugin's defaults, plus the UNet's spatial feedback as in its recipe) and once as the frozen-blocks
control (same init, same data, same head training), and compares a held-out loss. docs/learning.md has the
full study with seeds and budgets.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import fit_digits

from lightning_dfa import DFAStrategy, FeedbackEngine
from lightning_dfa.models import MLPClassifier

pytestmark = pytest.mark.slow  # trains or forks processes: seconds to minutes each


def test_frozen_control_leaves_the_blocks_bit_identical_after_training():
    pl.seed_everything(0)
    model = MLPClassifier(hidden=32, depth=2, weight_decay=0.1)
    before = copy.deepcopy(model.blocks.state_dict())
    head_before = model.head.weight.clone()
    fit_digits(model, steps=20, batch_size=32, strategy=DFAStrategy(mode="frozen"))
    for name, value in model.blocks.state_dict().items():
        assert torch.equal(value, before[name]), f"blocks.{name} moved under the frozen control"
    assert not torch.equal(model.head.weight, head_before)  # the head did train
    assert all(p.requires_grad for p in model.blocks.parameters())  # unfrozen again after fit


def train(model, loss_fn, batches, steps, lr, **dfa):
    """``steps`` AdamW steps of ``loss_fn(model, batch)`` with a DFA engine of settings ``dfa`` attached."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    with FeedbackEngine(**dfa).attach(model) as engine:
        engine.scale_updates(optimizer)
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batches(step)).backward()
            optimizer.step()
    return model


def dfa_and_frozen(build, loss_fn, batches, held_out, steps, lr, **dfa):
    """Held-out loss after training with DFA and as the frozen-blocks control, from the same init."""
    losses = {}
    for mode in ("dfa", "frozen"):
        torch.manual_seed(0)
        model = train(build(), loss_fn, batches, steps, lr, mode=mode, **dfa)
        with torch.no_grad():
            losses[mode] = float(loss_fn(model, held_out))
    return losses


# ---------------------------------------------------------------------- causal LM
def markov_text(step: int, batch: int = 16, length: int = 16, vocab: int = 64) -> torch.Tensor:
    """Sequences of a fixed random Markov chain: each token has 3 likely successors."""
    table = torch.randint(0, vocab, (vocab, 3), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1000 + step)
    ids = [torch.randint(0, vocab, (batch,), generator=generator)]
    for _ in range(length - 1):
        choice = torch.randint(0, 3, (batch,), generator=generator)
        ids.append(table[ids[-1], choice])
    return torch.stack(ids, dim=1)


def lm_loss(model, ids):
    return model(ids, labels=ids).loss


def test_dfa_beats_the_frozen_control_on_a_causal_lm():
    from conftest import tiny_gpt2

    held_out = markov_text(-1, batch=64)
    losses = dfa_and_frozen(tiny_gpt2, lm_loss, markov_text, held_out, steps=300, lr=1e-3)
    assert losses["dfa"] < losses["frozen"] - 0.1, losses


# ---------------------------------------------------------------------- ViT
def digits_batches(batch: int = 32):
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    y = torch.tensor(labels)
    return (lambda step: (x[(step * batch) % 1500 :][:batch], y[(step * batch) % 1500 :][:batch])), (x[1500:], y[1500:])


def vit_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(pixel_values=x).logits, y)


def test_dfa_beats_the_frozen_control_on_a_vit():
    from conftest import tiny_vit

    batches, held_out = digits_batches()
    losses = dfa_and_frozen(tiny_vit, vit_loss, batches, held_out, steps=100, lr=3e-3)
    assert losses["dfa"] < losses["frozen"] - 0.05, losses


# ---------------------------------------------------------------------- diffusion UNet
def ddpm_batches(batch: int = 32):
    """Noisy digits, noise and timesteps of a DDPM (linear betas, 1000 steps), fixed by the step number."""
    from diffusers import DDPMScheduler
    from sklearn.datasets import load_digits

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    data = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0

    def make(step: int):
        generator = torch.Generator().manual_seed(step)
        x = data[torch.randint(0, len(data), (batch,), generator=generator)]
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        return scheduler.add_noise(x, noise, t), t, noise

    return make, make(-1)


def ddpm_loss(unet, batch):
    noisy, t, noise = batch
    return F.mse_loss(unet(noisy, t).sample, noise)


def test_dfa_beats_the_frozen_control_on_a_diffusion_unet():
    from conftest import tiny_unet

    batches, held_out = ddpm_batches()
    losses = dfa_and_frozen(tiny_unet, ddpm_loss, batches, held_out, steps=150, lr=2e-3, spatial_feedback=True)
    assert losses["dfa"] < losses["frozen"] - 0.05, losses
