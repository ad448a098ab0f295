"""Non-finite losses, errors and feedback: ``DFA(nonfinite="stop")`` stops clearly, ``"skip"`` skips the step.

Either way no optimizer step ever applies NaN or inf: the weights (and the optimizer state) of a bad step
are bit-identical to those before it.
"""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFA, DFAStrategy, FeedbackEngine
from lightning_dfa.callback import SKIPPED_METRIC
from lightning_dfa.models import MLPClassifier

BAD_STEP = 2


class InfiniteGradient(torch.autograd.Function):
    """Identity forward; backward turns the incoming gradient (the error at the head) into inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Poisoned(MLPClassifier):
    """A tiny MLP whose step ``BAD_STEP`` has a NaN loss (``kind="loss"``) or an infinite error (``"error"``)."""

    def __init__(self, kind="loss", bad_steps=(BAD_STEP,), **kwargs):
        super().__init__(in_features=5, hidden=8, depth=2, num_classes=3, lr=0.05, **kwargs)
        self.kind, self.bad_steps = kind, set(bad_steps)

    def training_step(self, batch, batch_idx):
        x, y = batch
        bad = self.global_step in self.bad_steps
        logits = self(x)
        if bad and self.kind == "error":
            logits = InfiniteGradient.apply(logits)
        loss = F.cross_entropy(logits, y)
        return loss * float("nan") if bad and self.kind == "loss" else loss


class FlakyProjector(nn.Module):
    """Gaussian feedback that turns to NaN while ``poison`` is set (finite loss and error, non-finite feedback)."""

    def __init__(self, in_features=3, out_features=16):
        super().__init__()
        self.in_features, self.out_features, self.poison = in_features, out_features, False
        self.register_buffer("weight", torch.randn(in_features, out_features, generator=torch.Generator()))

    def forward(self, error):
        feedback = error @ self.weight
        return feedback * float("nan") if self.poison else feedback


class PoisonFeedback(pl.Callback):
    def __init__(self, projector):
        self.projector = projector

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.projector.poison = trainer.global_step == BAD_STEP


class Snapshots(pl.Callback):
    """Weights and optimizer state before and after every training batch."""

    def __init__(self):
        self.before, self.after, self.optimizer = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer[trainer.global_step] = _optimizer_state(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def unchanged(self, step):
        return all(torch.equal(self.before[step][k], self.after[step][k]) for k in self.before[step])


def _optimizer_state(trainer):
    state = trainer.optimizers[0].state_dict()["state"]
    return {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}


class MemoryLogger(Logger):
    """Keeps every logged metric in memory."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def data(batches=6):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * batches, 5, generator=generator), torch.randint(0, 3, (8 * batches,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(model, callbacks=(), steps=5, nonfinite="skip", logger=False, strategy=None, **kwargs):
    trainer = quiet_trainer(
        strategy=strategy or DFAStrategy(nonfinite=nonfinite),
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **kwargs,
    )
    trainer.fit(model, train_dataloaders=data())
    return trainer


# ---------------------------------------------------------------------------------------------- skip
def test_skip_leaves_weights_bit_identical_after_a_nan_loss():
    snapshots = Snapshots()
    with pytest.warns(RuntimeWarning, match="Skipped training step 2"):
        fit(Poisoned("loss"), [snapshots])
    assert snapshots.unchanged(BAD_STEP)


def test_skip_leaves_the_optimizer_state_untouched():
    snapshots = Snapshots()
    with pytest.warns(RuntimeWarning):
        fit(Poisoned("loss"), [snapshots])
    before, after = snapshots.optimizer[BAD_STEP], snapshots.optimizer[BAD_STEP + 1]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[i][k], after[i][k]) for i in before for k in before[i])


def test_skip_lets_training_continue_after_a_bad_step():
    snapshots = Snapshots()
    with pytest.warns(RuntimeWarning):
        trainer = fit(Poisoned("loss"), [snapshots], steps=5)
    assert trainer.global_step == 5
    assert not snapshots.unchanged(BAD_STEP + 1), "the next step trains again"


def test_skip_counts_the_step_and_logs_the_count():
    logger = MemoryLogger()
    with pytest.warns(RuntimeWarning):
        trainer = fit(Poisoned("loss"), logger=logger)
    assert trainer.strategy.dfa.nonfinite_steps == 1
    logged = [(step, m[SKIPPED_METRIC]) for step, m in logger.metrics if SKIPPED_METRIC in m]
    assert logged == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0), (4, 1.0)]
    assert trainer.callback_metrics[SKIPPED_METRIC] == 1


def test_skip_leaves_weights_bit_identical_after_an_infinite_error():
    snapshots = Snapshots()
    with pytest.warns(RuntimeWarning, match="error at the output point 'head'"):
        fit(Poisoned("error"), [snapshots])
    assert snapshots.unchanged(BAD_STEP)


def test_skip_leaves_weights_bit_identical_after_nan_feedback():
    projector, snapshots = FlakyProjector(), Snapshots()
    strategy = DFAStrategy(projector=projector, nonfinite="skip")
    with pytest.warns(RuntimeWarning, match=r"gradients of \['blocks.0.0.weight'"):
        fit(Poisoned("none"), [PoisonFeedback(projector), snapshots], strategy=strategy)
    assert snapshots.unchanged(BAD_STEP)


def test_skip_keeps_a_raising_projector_from_seeing_the_bad_error():
    snapshots = Snapshots()
    strategy = DFAStrategy(projector="seeded", nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="Skipped") as warned:
        trainer = fit(Poisoned("error"), [snapshots], strategy=strategy)
    assert snapshots.unchanged(BAD_STEP) and trainer.global_step == 5
    assert not any("rows are not finite" in str(w.message) for w in warned), "the projector saw the bad error"


def test_skip_drops_the_whole_accumulated_step_when_one_micro_batch_is_bad():
    class BadFirstMicroBatch(Poisoned):
        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            return loss * float("nan") if batch_idx == 2 else loss

    snapshots = Snapshots()
    with pytest.warns(RuntimeWarning, match="the loss is nan"):
        trainer = fit(BadFirstMicroBatch(), [snapshots], steps=2, accumulate_grad_batches=2)
    # batches 2 and 3 form optimizer step 1: the weights after batch 3 equal those before batch 2
    assert all(torch.equal(snapshots.before[1][k], v) for k, v in trainer.lightning_module.state_dict().items())


def test_skip_stops_after_too_many_consecutive_bad_steps():
    strategy = DFAStrategy(nonfinite="skip", nonfinite_patience=3)
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="3 consecutive training steps"):
        fit(Poisoned("loss", bad_steps=range(100)), strategy=strategy, steps=6)


# ---------------------------------------------------------------------------------------------- stop
def test_stop_names_the_nan_loss_the_step_and_the_fix():
    with pytest.raises(FloatingPointError, match=r"step 2 \(epoch 0\): the loss is nan.*nonfinite='skip'"):
        fit(Poisoned("loss"), nonfinite="stop")


def test_stop_names_the_error_point():
    with pytest.raises(FloatingPointError, match="the error at the output point 'head' holds NaN or inf"):
        fit(Poisoned("error"), nonfinite="stop")


def test_stop_names_the_parameters_with_non_finite_gradients():
    projector = FlakyProjector()
    strategy = DFAStrategy(projector=projector)
    with pytest.raises(FloatingPointError, match=r"gradients of \['blocks.0.0.weight', 'blocks.0.0.bias'"):
        fit(Poisoned("none"), [PoisonFeedback(projector)], strategy=strategy)


def test_stop_is_the_default_and_leaves_the_last_good_weights():
    snapshots = Snapshots()
    model = Poisoned("loss")
    with pytest.raises(FloatingPointError, match="weights are those of the previous step"):
        fit(model, [snapshots], strategy="dfa")
    assert all(torch.equal(snapshots.before[BAD_STEP][k], v) for k, v in model.state_dict().items())


def test_backprop_mode_is_guarded_too():
    with pytest.raises(FloatingPointError, match="the loss is nan"):
        fit(Poisoned("loss"), strategy=DFAStrategy(mode="backprop"))


def test_dfa_callback_under_another_strategy_is_guarded_too():
    dfa = DFA(blocks="blocks.*", output="head", nonfinite="skip")
    snapshots = Snapshots()
    with pytest.warns(RuntimeWarning):
        fit(Poisoned("loss"), [dfa, snapshots], strategy="auto")
    assert snapshots.unchanged(BAD_STEP) and dfa.nonfinite_steps == 1


def test_plain_attach_without_lightning_still_raises_on_a_non_finite_error(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head", nonfinite="skip").attach(mlp)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        (mlp(batch[0]) * float("nan")).sum().backward()


# ---------------------------------------------------------------------------------------------- settings
def test_nonfinite_is_one_of_the_dfa_settings():
    dfa = DFA(blocks="blocks.*", nonfinite="skip", nonfinite_patience=4)
    assert (dfa.config.nonfinite, dfa.config.nonfinite_patience) == ("skip", 4)
    assert DFA(**dfa.config.settings()).config.nonfinite == "skip"


def test_the_strategy_passes_nonfinite_to_its_dfa():
    class Configured(Poisoned):
        def configure_dfa(self):
            return {"blocks": "blocks.*", "output": "head", "nonfinite": "skip"}

    with pytest.warns(RuntimeWarning):
        trainer = fit(Configured("loss"), strategy="dfa")
    assert trainer.strategy.dfa.config.nonfinite == "skip"


def test_the_skipped_count_is_kept_in_checkpoints():
    dfa = DFA(blocks="blocks.*", output="head")
    dfa.nonfinite_steps = 3
    restored = DFA(blocks="blocks.*", output="head")
    restored.load_state_dict(dfa.state_dict())
    assert restored.nonfinite_steps == 3


def test_nonfinite_can_be_set_from_the_command_line(tmp_path):
    from lightning_dfa.cli import run

    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.strategy.nonfinite=skip",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.strategy.dfa.config.nonfinite == "skip"
