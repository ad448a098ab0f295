"""Run history and feedback statistics: curves saved with the run, feedback sizes as the step used them."""

import json

import pytest
from conftest import fit_digits

import lightning_dfa  # noqa: F401
from lightning_dfa.callbacks import Alignment, FeedbackStats, History
from lightning_dfa.callbacks.history import plot_history
from lightning_dfa.models import MLPClassifier


def fit(tmp_path, callbacks, mode="dfa", steps=6, model=None):
    strategy = lightning_dfa.DFAStrategy(mode=mode)
    validation = {"limit_val_batches": 1.0, "val_check_interval": 3, "num_sanity_val_steps": 0}
    return fit_digits(
        model, steps=steps, strategy=strategy, default_root_dir=tmp_path, callbacks=callbacks, **validation
    )


def test_history_saves_curves_and_json_with_the_run(tmp_path):
    history = History()
    fit(tmp_path, [Alignment(every_n_steps=2), history])
    saved = json.loads((tmp_path / "history-dfa.json").read_text())
    assert [step for step, _ in saved["train"]] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in saved["val"]] == [3.0, 6.0] and "val/acc" in saved["val"][0]
    assert [row["step"] for row in saved["alignment"]] == [0.0, 2.0, 4.0]
    assert (tmp_path / "curves-dfa.png").stat().st_size > 10_000


class LogsAtEpochEnd(MLPClassifier):
    """Logs a validation metric in its own ``on_validation_epoch_end``, as CausalLM logs its perplexity."""

    def on_validation_epoch_end(self):
        self.log("val/steps_seen", float(self.global_step))


def test_history_holds_each_validation_check_with_the_values_logged_at_that_check(tmp_path):
    history = History(plot=False)
    fit(tmp_path, [history], model=LogsAtEpochEnd(hidden=16, depth=2))
    assert [(row["step"], row["val/steps_seen"]) for row in history.val] == [(3.0, 3.0), (6.0, 6.0)]


def test_feedback_stats_follow_the_gaussian_scale_convention(tmp_path):
    stats = FeedbackStats(every_n_steps=1)
    trainer = fit(tmp_path, [stats])
    assert stats.latest["feedback/error_rms"] > 0
    for name in ("blocks.0", "blocks.1"):
        # entries of e @ B with B ~ N(0, 1/d_e) have the error's RMS on average (16 rows: loose bounds)
        assert 0.3 < stats.latest[f"feedback_ratio/{name}"] < 3
    assert "feedback_rms/blocks.0" in trainer.callback_metrics
    assert not trainer.strategy.dfa.engine.observers, "the observer is removed at the end of fit"


def test_feedback_stats_log_nothing_without_feedback(tmp_path):
    stats = FeedbackStats(every_n_steps=1)
    fit(tmp_path, [stats], mode="backprop")
    assert stats.latest == {}


@pytest.mark.parametrize("callback", [FeedbackStats, Alignment])
def test_diagnostics_refuse_a_zero_interval(callback):
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        callback(every_n_steps=0)


def recorded(alignment):
    history = History()
    history.train = [(1, 2.0), (2, 1.5)]
    history.val = [{"step": 2.0, "val/loss": 1.4}]
    history.alignment = [{"step": 2.0, "alignment/mean": 0.3}] if alignment else []
    return history


def test_each_run_keeps_one_colour_in_every_panel_of_the_comparison(tmp_path):
    runs = {"dfa": recorded(True), "frozen": recorded(False), "backprop": recorded(True)}
    # The frozen control has no alignment panel curve: backprop must not take its colour.
    figure = plot_history(runs, tmp_path / "comparison.png")
    colours = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            mode = line.get_label().split()[0]
            if mode in runs:  # not the zero line
                colours.setdefault(mode, set()).add(line.get_color())
    assert [len(found) for found in colours.values()] == [1, 1, 1]
    assert len({next(iter(found)) for found in colours.values()}) == 3
