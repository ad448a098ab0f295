"""Logging failures never lose the training state: W&B that cannot start or fails mid-run, a full disk or an
unwritable run directory for the history, plots and summary. Training and checkpointing go on, with a warning
that names the path (or logger) and the cause."""

import errno
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_args, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa.callbacks import History
from lightning_dfa.cli import run
from lightning_dfa.loggers import FALLBACK_DIR, guard_loggers
from lightning_dfa.models import MLPClassifier
from lightning_dfa.runs import latest_run


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def data():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(tmp_path, logger=False, callbacks=(), root=None, steps=3):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = quiet_trainer(
        strategy="dfa",
        max_steps=steps,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=True,
        limit_val_batches=0,
        default_root_dir=root or tmp_path,
        callbacks=[checkpoints, *callbacks],
    )
    trainer.fit(MLPClassifier(in_features=5, hidden=8, depth=2, num_classes=3), train_dataloaders=data())
    return trainer


class FailingRun:
    """Stands in for a W&B run whose ``log`` fails (the service died, or its disk is full)."""

    id = "failing"
    name = "failing"

    class config:  # noqa: N801 - mimics wandb.Run.config
        @staticmethod
        def update(*args, **kwargs):
            pass

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")


class BrokenLogger(Logger):
    """A logger whose every write fails; counts the attempts."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @property
    def name(self):
        return "broken"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        raise ConnectionError("logging service unreachable")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class MemoryLogger(Logger):
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
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


# ---------------------------------------------------------------------------------------------- run files
def test_history_on_a_full_disk_warns_with_the_path_and_cause_and_the_run_ends(tmp_path, monkeypatch):
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        return disk_full() if self.name.startswith("history-") else original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.warns(RuntimeWarning, match=r"Could not write the run history to '.*history-dfa.json': No space left"):
        trainer = fit(tmp_path, callbacks=[History()])
    assert trainer.state.finished and trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_a_plot_that_cannot_be_saved_warns_and_keeps_the_history(tmp_path, monkeypatch):
    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.warns(RuntimeWarning, match=r"Could not write the curves to '.*curves-dfa.png': No space left"):
        fit(tmp_path, callbacks=[History()])
    assert (tmp_path / "history-dfa.json").exists()


def test_an_unwritable_run_dir_warns_and_checkpoints_are_still_saved(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    root = tmp_path / "a-file" / "run"
    with pytest.warns(RuntimeWarning, match=r"Could not write the run history to '.*a-file/run/history-dfa.json'"):
        trainer = fit(tmp_path, callbacks=[History()], root=root)
    assert trainer.state.finished
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_the_cli_summary_on_a_full_disk_warns_and_the_result_is_kept(tmp_path, monkeypatch):
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        return disk_full() if self.name == "summary.json" else original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    args = ["fit", "--config", "digits-mlp", "--trainer.max_steps=2", *quiet_args()]
    with pytest.warns(RuntimeWarning, match=r"Could not write the summary to '.*summary.json': No space left"):
        cli = run([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert cli.result.steps == 2
    assert list((latest_run(tmp_path) / "checkpoints").glob("*.ckpt"))


# ---------------------------------------------------------------------------------------------- W&B
def test_wandb_that_cannot_start_is_replaced_by_a_csv_logger_and_training_goes_on(tmp_path, monkeypatch):
    import wandb

    def unreachable(*args, **kwargs):
        raise wandb.errors.CommError("api.wandb.ai is unreachable")

    monkeypatch.setattr(wandb, "init", unreachable)
    args = ["fit", "--config", "digits-mlp", "--trainer.max_steps=2", *quiet_args(logger=True)]
    with pytest.warns(RuntimeWarning, match=r"WandbLogger failed to start.*CommError: api.wandb.ai is unreachable"):
        cli = run([*args, f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    assert list(tmp_path.rglob("*.ckpt")), "checkpoints are still written"
    assert list((latest_run(tmp_path) / FALLBACK_DIR).rglob("metrics.csv")), "metrics go to the fallback CSV logger"


def test_wandb_that_fails_mid_run_is_switched_off_and_training_goes_on(tmp_path):
    logger = WandbLogger(project="lightning-dfa-test", save_dir=str(tmp_path))
    logger._experiment = FailingRun()
    with pytest.warns(RuntimeWarning, match=r"WandbLogger failed in log_metrics\(\).*OSError: \[Errno 28\]"):
        trainer = fit(tmp_path, logger=logger)
    assert trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert any(isinstance(other, CSVLogger) for other in trainer.loggers), "a fallback logger takes over"


def test_a_failing_logger_is_warned_about_once_and_then_left_alone(tmp_path, recwarn):
    broken = BrokenLogger()
    fit(tmp_path, logger=broken, steps=4)
    assert broken.calls == 1
    assert sum("BrokenLogger failed" in str(w.message) for w in recwarn) == 1


def test_healthy_loggers_keep_logging_without_a_fallback(tmp_path):
    broken, memory = BrokenLogger(), MemoryLogger()
    with pytest.warns(RuntimeWarning, match="ConnectionError: logging service unreachable"):
        trainer = fit(tmp_path, logger=[broken, memory], steps=3)
    assert len(memory.metrics) >= 3
    assert not any(isinstance(other, CSVLogger) for other in trainer.loggers)


def test_guarding_twice_wraps_a_logger_once(tmp_path):
    memory = MemoryLogger()
    trainer = pl.Trainer(logger=memory, default_root_dir=tmp_path)
    guard_loggers(trainer)
    wrapped = memory.log_metrics
    guard_loggers(trainer)
    assert memory.log_metrics is wrapped
