"""Two-process runs (DDP, gloo, CPU) finish and write their run files: ``lightning-dfa fit`` on the digits
recipe (with its Alignment, FeedbackStats and History callbacks), and a ``Trainer`` with ``History``.

``trainer.log_dir`` is a collective (rank 0 broadcasts it): read on rank 0 only, rank 0 waits for a
broadcast the others never join (or that some later collective of theirs answers) and the run hangs or
fails after training.

The ranks are forked with torchrun's variables set, so Lightning joins them instead of launching new
interpreters: the whole run takes seconds. A rank that hangs is killed at a deadline, which fails the test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import quiet_trainer
from forking import WORLD, free_port, run_ranks, torchrun_env
from torch.utils.data import DataLoader, TensorDataset

from lightning_dfa.runs import latest_run

pytestmark = pytest.mark.slow  # trains or forks processes: seconds to minutes each

DEADLINE_S = 150


def fork_ranks(worker: Any, root: Path) -> list[int | None]:
    """Run ``worker(rank, port, root)`` in ``WORLD`` forked processes; their exit codes (killed at the deadline)."""
    return run_ranks(worker, (free_port(), str(root)), DEADLINE_S)


def _cli_rank(rank: int, port: int, root: str) -> None:
    torchrun_env(rank, port)
    from lightning_dfa.cli import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cli_run(run, root)
    Path(root, f"rank{rank}.warnings").write_text("\n".join(str(w.message) for w in caught))
    Path(root, f"rank{rank}.done").touch()


def _cli_run(run: Any, root: str) -> None:
    run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.strategy.class_path=lightning_dfa.DFADDPStrategy",
            "--trainer.accelerator=cpu",
            f"--trainer.devices={WORLD}",
            "--trainer.max_steps=5",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}",
        ]
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict[str, Any]:
    """Both ranks' exit codes and the run directory."""
    root = tmp_path_factory.mktemp("ddp-cli")
    return {"root": root, "exit": fork_ranks(_cli_rank, root)}


def test_every_rank_of_a_two_process_cli_run_finishes(two_process_run):
    assert two_process_run["exit"] == [0] * WORLD
    assert all((two_process_run["root"] / f"rank{rank}.done").exists() for rank in range(WORLD))


def test_a_two_process_cli_run_writes_its_summary(two_process_run):
    summary = json.loads((latest_run(two_process_run["root"]) / "summary.json").read_text())
    assert summary["runs"][0]["mode"] == "dfa" and summary["runs"][0]["steps"] == 5


def test_a_two_process_cli_run_writes_its_history(two_process_run):
    history = json.loads((latest_run(two_process_run["root"]) / "history-dfa.json").read_text())
    assert [step for step, _ in history["train"]] == [1, 2, 3, 4, 5]
    assert (latest_run(two_process_run["root"]) / "curves-dfa.png").exists()


def test_a_two_process_cli_run_writes_one_run_folder(two_process_run):
    assert sorted(p.name for p in two_process_run["root"].glob("version_*")) == ["version_0"]


def test_a_two_process_cli_run_logs_its_metrics_over_both_ranks(two_process_run):
    for rank in range(WORLD):  # Lightning warns on rank 0 when an epoch-level metric is logged without sync_dist
        assert "sync_dist" not in (two_process_run["root"] / f"rank{rank}.warnings").read_text()


def _history_rank(rank: int, port: int, root: str) -> None:
    from lightning_dfa import DFADDPStrategy
    from lightning_dfa.callbacks import History
    from lightning_dfa.models import MLPClassifier

    torchrun_env(rank, port)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 5), torch.randint(0, 3, (16,)))
    trainer = quiet_trainer(
        strategy=DFADDPStrategy(), devices=WORLD, max_steps=2, default_root_dir=root, callbacks=[History(plot=False)]
    )
    trainer.fit(MLPClassifier(in_features=5, hidden=7, depth=2, num_classes=3), DataLoader(data, batch_size=4))
    Path(root, f"rank{rank}.done").touch()


def test_a_two_process_fit_with_history_finishes_and_writes_it(tmp_path):
    assert fork_ranks(_history_rank, tmp_path) == [0] * WORLD
    history = json.loads((tmp_path / "history-dfa.json").read_text())
    assert [step for step, _ in history["train"]] == [1, 2]
