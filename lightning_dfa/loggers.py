"""Loggers that may fail without taking the run down (W&B unreachable, a full disk): a failing call warns once
and switches that logger off; training goes on.

:func:`guard_loggers` switches a failing logger off with a warning, and when none is left writes the metrics to
a ``CSVLogger`` in the run directory. The ``DFA`` callback guards the loggers of every run it trains.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import loggers
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dfa import _lightning_compat

#: Logger methods that touch the network or the disk; each is guarded.
GUARDED = (
    "log_metrics",
    "log_hyperparams",
    "log_graph",
    "log_image",
    "log_table",
    "log_text",
    "after_save_checkpoint",
    "save",
    "finalize",
)

#: Where the replacement ``CSVLogger`` writes, under the run directory.
FALLBACK_DIR = "fallback-logs"

_guarded: weakref.WeakSet[Logger] = weakref.WeakSet()
_failed: weakref.WeakSet[Logger] = weakref.WeakSet()


def guard_loggers(trainer: pl.Trainer, start: bool = False) -> None:
    """Make every logger of ``trainer`` fail softly: warn once, switch it off, keep training. With ``start=True``
    each logger's experiment (the W&B run) starts now, before ``fit``, and one that cannot is replaced at once."""
    for logger in [lg for lg in trainer.loggers if lg not in _guarded]:
        try:
            _ = logger.experiment if start else None
        except Exception as err:  # noqa: BLE001 - any failure of a logger must not stop training
            _switch_off(trainer, logger, "to start", err)
            continue
        _guard(trainer, logger)


def _guard(trainer: pl.Trainer, logger: Logger) -> None:
    def wrap(name: str, method: Any) -> Any:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            if logger in _failed:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any failure of a logger must not stop training
                _switch_off(trainer, logger, f"in {name}()", err)
                return None

        return call

    _guarded.add(logger)
    _lightning_compat.wrap_methods(logger, GUARDED, wrap)


def _switch_off(trainer: pl.Trainer, logger: Logger, action: str, err: Exception) -> None:
    _guarded.add(logger)
    _failed.add(logger)
    healthy = [other for other in trainer.loggers if other not in _failed]
    # A logger that never started is dropped (Lightning would start it again); one that failed later stays, muted.
    kept = [other for other in trainer.loggers if other is not logger or action != "to start"]
    fallback = ""
    if not healthy:
        replacement = CSVLogger(trainer.default_root_dir, name=FALLBACK_DIR)
        _guard(trainer, replacement)
        kept.append(replacement)
        fallback = f" Metrics now go to a CSVLogger in {replacement.log_dir!r}."
    trainer.loggers = kept
    rank_zero_warn(
        f"{type(logger).__name__} failed {action}{_describe_dir(logger)}: {type(err).__name__}: {err}. "
        f"Training and checkpointing go on; this logger is off for the rest of the run.{fallback} To fix: check "
        "the network or W&B login (or set WANDB_MODE=offline), and the free space and permissions of the log "
        "directory.",
        category=RuntimeWarning,
    )


def _describe_dir(logger: Logger) -> str:
    try:
        folder = logger.save_dir
    except Exception:  # noqa: BLE001 - a broken logger may fail here too
        folder = None
    return f" (save_dir {folder!r})" if folder else ""


class WandbLogger(loggers.WandbLogger):
    """Lightning's ``WandbLogger`` less the ``anonymous=None`` it always hands to ``wandb.init``, for which wandb
    0.23+ warns "The anonymous setting has no effect" on every run (``anonymous=True`` still reaches wandb)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _lightning_compat.drop_unset_anonymous(self)
