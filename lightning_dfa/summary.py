"""The end-of-fit summary: one run, or DFA beside its baselines (frozen-blocks control, backprop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_dfa.callbacks.common import find_dfa
from lightning_dfa.callbacks.history import History

#: Metric families shown in the summary (per-point diagnostics stay in the logs and plots).
SHOWN = ("val/", "test/", "train/loss", "alignment/mean")


@dataclass
class RunResult:
    """What a finished ``fit`` (and its test) produced."""

    mode: str
    steps: int
    seconds: float
    metrics: dict[str, float]
    history: History | None = None
    peak_memory_mb: float | None = None
    #: The ``OpticalLedger``'s :meth:`summary` (totals over the run), when the run had one.
    ledger: dict[str, float] | None = None

    @classmethod
    def of(cls, trainer: pl.Trainer, seconds: float, metrics: dict[str, Any]) -> RunResult:
        dfa = find_dfa(trainer)
        shown = {k: float(v) for k, v in metrics.items() if k.startswith(SHOWN) and not k.endswith("_step")}
        history = next((c for c in trainer.callbacks if isinstance(c, History)), None)
        ledger = next((c for c in trainer.callbacks if type(c).__name__ == "OpticalLedger"), None)
        costs = ledger.summary() if ledger is not None and ledger.steps else None
        mode = dfa.mode if dfa is not None else "backprop (no DFA)"
        device = trainer.strategy.root_device
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        return cls(mode, trainer.global_step, seconds, shown, history, peak, costs)

    @property
    def extras(self) -> dict[str, str]:
        """The optical ledger's totals and per-step times as text, when the run had an ``OpticalLedger``."""
        if not self.ledger:
            return {}
        t, steps = self.ledger, max(self.ledger["steps"], 1)
        optical_ms, electronic_ms = (1e3 * t[f"{side}_time_s"] / steps for side in ("optical", "electronic"))
        return {
            "optical / electronic projection time": f"{t['optical_time_s']:.3g} s / {t['electronic_time_s']:.3g} s",
            "optical / electronic ms per step": f"{optical_ms:.3g} / {electronic_ms:.3g}",
            "optical / electronic energy": f"{t['optical_energy_j']:.3g} J / {t['electronic_energy_j']:.3g} J",
        }

    def as_dict(self) -> dict[str, Any]:
        fields = ("mode", "steps", "seconds", "metrics", "extras", "peak_memory_mb", "ledger")
        return {name: getattr(self, name) for name in fields} | {"ms_per_step": self.ms_per_step}

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps if self.steps else math.nan


def summary_table(runs: list[RunResult], references: dict[str, float] | None = None) -> str:
    """A plain-text table: a column per run (mode), a row per metric, then reference values."""
    columns = [run.mode for run in runs]
    rows: list[tuple[str, list[str]]] = [
        ("steps", [str(run.steps) for run in runs]),
        ("fit time (s)", [f"{run.seconds:.1f}" for run in runs]),
        ("time per step (ms)", [f"{run.ms_per_step:.1f}" for run in runs]),
    ]
    if any(run.peak_memory_mb is not None for run in runs):
        rows.append(("peak CUDA memory (MB)", [_fmt(run.peak_memory_mb) for run in runs]))
    for key in sorted({k for run in runs for k in run.metrics}):
        rows.append((key, [_fmt(run.metrics.get(key)) for run in runs]))
    for key in sorted({k for run in runs for k in run.extras}):
        rows.append((key, [run.extras.get(key, "-") for run in runs]))
    for key, value in (references or {}).items():
        rows.append((f"{key} (reference)", [_fmt(value)] + [""] * (len(runs) - 1)))
    width = max(len(name) for name, _ in rows)
    cells = [max(len(c), *(len(values[i]) for _, values in rows)) for i, c in enumerate(columns)]
    line = lambda name, values: f"{name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cells))  # noqa: E731
    out = ["", "lightning-dfa summary", line("", columns), "-" * (width + 2 + sum(cells) + 2 * len(cells))]
    return "\n".join(out + [line(name, values) for name, values in rows])


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
