"""What the diagnostic callbacks share: finding the run's DFA engine, checking their ``every_n_steps``."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_dfa._checks import check_int
from lightning_dfa.callback import DFA
from lightning_dfa.feedback import FeedbackEngine


def find_dfa(trainer: pl.Trainer) -> FeedbackEngine | None:
    """The DFA engine of a run: the strategy's, or a ``DFA`` among the callbacks; ``None`` without DFA."""
    callback = getattr(trainer.strategy, "dfa", None) or next(
        (c for c in trainer.callbacks if isinstance(c, DFA)), None
    )
    return callback.engine if callback is not None else None


def check_every_n_steps(every_n_steps: int) -> int:
    """``every_n_steps`` of a diagnostic callback, or a clear error if it is not a positive integer."""
    return check_int("every_n_steps", every_n_steps, 1)
