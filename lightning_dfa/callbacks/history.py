"""``History``: at the end of ``fit``, the run's curves as ``history-<mode>.json`` and ``curves-<mode>.png``.

Example::

    history = History()
    Trainer(strategy="dfa", callbacks=[Alignment(), history]).fit(model)
    history.path("curves-dfa.png")
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_dfa.callbacks.alignment import Alignment
from lightning_dfa.callbacks.common import find_dfa


class History(Callback):
    """Training loss per step, validation metrics per validation, alignment per probe (module docstring)."""

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.train: list[tuple[int, float]] = []
        self.val: list[dict[str, float]] = []
        self.alignment: list[dict[str, float]] = []
        self.run_dir: Path | None = None
        self.mode = "run"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run that hook before the module's, so a metric the module logs
        # in its own on_validation_epoch_end (CausalLM's perplexity) would still hold the previous check's value.
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        self.val.append({"step": float(trainer.global_step), **metrics})

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        probe = next((c for c in trainer.callbacks if isinstance(c, Alignment)), None)
        self.alignment = list(probe.history) if probe is not None else []
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective (a broadcast): every rank asks
        if not trainer.is_global_zero:
            return
        dfa = find_dfa(trainer)
        self.mode = dfa.mode if dfa is not None else "run"
        self.run_dir = run_dir
        # The curves are a by-product: a full disk or an unwritable run dir warns, and the run ends normally.
        saved = write_or_warn(self.path(f"history-{self.mode}.json"), self._write_json, "the run history")
        if self.plot and saved:
            curves = self.path(f"curves-{self.mode}.png")
            if write_or_warn(curves, lambda path: plot_history({self.mode: self}, path), "the curves"):
                for logger in trainer.loggers:
                    if isinstance(logger, WandbLogger):
                        logger.log_image("curves", [str(curves)])

    def _write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1))

    def path(self, name: str) -> Path:
        if self.run_dir is None:
            raise RuntimeError("History has no run directory before the end of fit.")
        return self.run_dir / name

    def as_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val, "alignment": self.alignment}

    @classmethod
    def load(cls, path: str | Path) -> History:
        """A history saved by a finished run (``history-<mode>.json``), e.g. to plot runs side by side."""
        saved = json.loads(Path(path).read_text())
        history = cls()
        history.train = [tuple(point) for point in saved["train"]]
        history.val, history.alignment = saved["val"], saved["alignment"]
        history.run_dir = Path(path).parent
        return history


def write_or_warn(path: Path, write: Callable[[Path], Any], what: str) -> bool:
    """Run ``write(path)``; on ``OSError`` (disk full, read-only folder) warn and return False: losing the files
    that accompany a run (history, plots, summary) must not end it.
    """
    try:
        write(path)
    except OSError as err:
        cause = f"{err.strerror} (errno {err.errno})" if err.strerror else f"{type(err).__name__}: {err}"
        rank_zero_warn(
            f"Could not write {what} to {str(path)!r}: {cause}. Training and checkpoints are unaffected; free some "
            "space or make the run directory writable (Trainer(default_root_dir=...)) to keep these files.",
            category=RuntimeWarning,
        )
        return False
    return True


def plot_history(runs: dict[str, History], path: Path) -> Any:
    """Save training loss, validation metrics and alignment of one or several runs (e.g. DFA, frozen, backprop),
    a panel per curve, each run in one colour in every panel; return the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_keys = sorted({k for h in runs.values() for row in h.val for k in row if k != "step"})
    panels = ["train/loss", *val_keys] + (["alignment"] if any(h.alignment for h in runs.values()) else [])
    # A colour per run, fixed here: a panel that some runs lack (alignment without frozen) would shift the cycle.
    colors = {label: f"C{i}" for i, label in enumerate(runs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            for label, history in runs.items():
                _draw(ax, panel, label, history, colors[label] if len(runs) > 1 else None)
            ax.set_title(panel)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return fig


def _draw(ax: Any, panel: str, label: str, history: History, color: str | None) -> None:
    """One run's curve in one panel; ``color`` None (a single run) lets its alignment curves per block differ."""
    if panel == "train/loss" and history.train:
        steps, losses = zip(*history.train)
        ax.plot(steps, _smooth(list(losses)), label=label, color=color)
    elif panel == "alignment":
        names = sorted({k for row in history.alignment for k in row if k.startswith("alignment/")})
        for name in names if color is None else ["alignment/mean"]:
            rows = [row for row in history.alignment if name in row]
            if rows:
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], label=f"{label} {name[10:]}", color=color)
        ax.axhline(0, color="grey", lw=0.5)
    else:
        rows = [row for row in history.val if panel in row]
        ax.plot([r["step"] for r in rows], [r[panel] for r in rows], marker=".", label=label, color=color)


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out
