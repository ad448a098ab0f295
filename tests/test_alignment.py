"""The alignment callback: cosine 1 under backprop, a valid cosine under DFA, training gradients untouched."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import fit_digits

import lightning_dfa  # noqa: F401
from lightning_dfa import DFAStrategy
from lightning_dfa.callbacks.alignment import Alignment


class GradSpy(pl.Callback):
    """Records the gradients the optimizer is about to use (registered after Alignment)."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def fit(mode, callbacks, steps=4, **trainer_kwargs):
    strategy = DFAStrategy(mode=mode)
    return fit_digits(steps=steps, hidden=32, strategy=strategy, callbacks=callbacks, **trainer_kwargs)


def test_alignment_is_one_under_backprop():
    alignment = Alignment(every_n_steps=2)
    fit("backprop", [alignment])
    assert [row["step"] for row in alignment.history] == [0.0, 2.0]
    for row in alignment.history:
        assert row["alignment/blocks.0"] == pytest.approx(1.0, abs=1e-5)
        assert row["grad_ratio/blocks.1"] == pytest.approx(1.0, abs=1e-5)


def test_alignment_is_a_valid_cosine_under_dfa():
    alignment = Alignment(every_n_steps=1)
    trainer = fit("dfa", [alignment])
    assert len(alignment.history) == 4
    for row in alignment.history:
        for name in ("blocks.0", "blocks.1"):
            assert -1 <= row[f"alignment/{name}"] <= 1
            assert row[f"alignment/{name}"] != pytest.approx(1.0, abs=1e-3)
    assert "alignment/mean" in trainer.callback_metrics


def test_alignment_does_not_change_the_training_gradients():
    with_probe, without = GradSpy(), GradSpy()
    fit("dfa", [Alignment(every_n_steps=1), with_probe])
    fit("dfa", [without])
    for probed, plain in zip(with_probe.grads, without.grads):
        for name in plain:
            torch.testing.assert_close(probed[name], plain[name], rtol=0, atol=0)


def test_alignment_with_gradient_accumulation_compares_one_batch():
    alignment = Alignment(every_n_steps=1)
    fit("backprop", [alignment], steps=2, accumulate_grad_batches=2)
    assert alignment.history and all(
        row["alignment/blocks.0"] == pytest.approx(1.0, abs=1e-5) for row in alignment.history
    )


def test_alignment_skips_the_frozen_control():
    alignment = Alignment(every_n_steps=1)
    fit("frozen", [alignment])
    assert alignment.history == []


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        Alignment(every_n_steps=0)
