"""``DFA``: the feedback engine as a Lightning ``Callback``, so any strategy can train with DFA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_dfa.feedback import FeedbackEngine


class DFA(FeedbackEngine, Callback):
    """Direct Feedback Alignment for a LightningModule (or, via :meth:`attach`, any ``nn.Module``).

    As a callback it attaches at the start of ``fit`` (``on_fit_start``: after the model's ``setup`` and
    ``configure_model``, so models may build their layers there) and detaches at its end; its feedback state
    (seed, layout, projector) is saved in checkpoints and restored on resume.

    Example::

        trainer = Trainer(callbacks=[DFA(blocks="blocks.*", output="head")])   # any strategy
        trainer = Trainer(strategy="dfa")                                      # the same, as a strategy

    Without Lightning::

        with DFA(blocks="transformer.h.*", output="lm_head").attach(gpt2) as dfa:
            gpt2(input_ids, labels=input_ids).loss.backward()
            dfa.projector, dfa.layout   # audit: grad of point i == dfa.projector(e)[:, dfa.layout[i]]
    """

    @property
    def state_key(self) -> str:
        return "lightning_dfa.DFA"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After setup() and configure_model(): models may build their layers there.
        if self.model is not None:
            self.detach()
        self.attach(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.model is not None:  # fit interrupted by an exception
            self.detach()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check_routed()

    def state_dict(self) -> dict[str, Any]:
        return FeedbackEngine.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        FeedbackEngine.load_state_dict(self, state_dict)


def as_dfa(spec: DFA | FeedbackEngine | Mapping[str, Any], where: str) -> DFA:
    """A ``DFA`` from a ``DFA`` instance or a mapping of its arguments (``configure_dfa()``'s return)."""
    if isinstance(spec, DFA):
        return spec
    if isinstance(spec, Mapping):
        try:
            return DFA(**spec)
        except TypeError as err:
            raise TypeError(f"{where} returned invalid DFA arguments {sorted(spec)}: {err}") from err
    raise TypeError(f"{where} must return a DFA or a dict of its arguments, got {type(spec).__name__}.")


def find_dfa(trainer: pl.Trainer) -> FeedbackEngine | None:
    """The DFA engine of a run: the strategy's, or a ``DFA`` among the callbacks; ``None`` without DFA."""
    engine = getattr(trainer.strategy, "dfa", None)
    return engine or next((c for c in trainer.callbacks if isinstance(c, FeedbackEngine)), None)
