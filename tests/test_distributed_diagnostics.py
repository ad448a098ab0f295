"""The diagnostics that run the model outside Lightning's step work under DDP and FSDP (two CPU ranks, gloo).

- ``Alignment`` re-runs ``training_step`` for the true gradient: under DDP and ``dfa_fsdp`` it reports the
  cosines of one process on the global batch, and under FSDP it leaves the step's gradients as they were
  (the weights end as the single process's).
- ``CausalLM.generate_sample`` calls the HF model's ``generate``: under ``dfa_fsdp`` (GPT-2 blocks
  auto-wrapped) the sample written after validation is the one the gathered weights give on one process.

Ranks are forked with torchrun's variables (Lightning joins them), as in tests/test_distributed.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from conftest import quiet_trainer
from forking import WORLD, free_port, run_ranks, torchrun_env
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFADDPStrategy, DFAFSDPStrategy, DFAStrategy
from lightning_dfa.callbacks import Alignment
from lightning_dfa.models import CausalLM, MLPClassifier

pytestmark = pytest.mark.slow  # trains or forks processes: seconds to minutes each

PER_RANK, STEPS = 4, 3
DEADLINE_S = 150
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 16}
GPT2.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def fork_ranks(worker: Any, folder: Path) -> list[int | None]:
    """Run ``worker(rank, folder)`` in ``WORLD`` forked ranks; their exit codes (killed at the deadline)."""
    return run_ranks(_rank, (worker, free_port(), str(folder)), DEADLINE_S)


def _rank(rank: int, worker: Any, port: int, folder: str) -> None:
    torchrun_env(rank, port)
    worker(rank, Path(folder))


def trainer(strategy: Any, devices: int = WORLD, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(strategy=strategy, devices=devices, **kwargs)


# ---------------------------------------------------------------------------------------------- Alignment
def classifier() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(in_features=5, hidden=7, depth=2, num_classes=3, lr=0.01)


def samples(batch_size: int) -> DataLoader:
    """One global batch of ``WORLD * PER_RANK`` rows per epoch: rank ``r`` reads rows ``r, r + 2, ...``."""
    generator = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(WORLD * PER_RANK, 5, generator=generator),
        torch.randint(0, 3, (WORLD * PER_RANK,), generator=generator),
    )
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class SaveRun(pl.Callback):
    """Writes each rank's alignment rows and, from rank 0, the full trained weights."""

    def __init__(self, folder: Path, alignment: Alignment) -> None:
        self.folder, self.alignment = folder, alignment

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        torch.save(self.alignment.history, self.folder / f"alignment{trainer.global_rank}.pt")
        wrapper = trainer.strategy.model
        whole = (
            FullyShardedDataParallel.summon_full_params(wrapper)
            if isinstance(wrapper, FullyShardedDataParallel)
            else None
        )
        with whole or torch.no_grad():
            weights = {
                name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for name, p in pl_module.named_parameters()
            }
        if trainer.global_rank == 0:
            torch.save(weights, self.folder / "weights.pt")


def fit_with_alignment(strategy: Any, folder: Path, devices: int = WORLD) -> None:
    alignment = Alignment(every_n_steps=1)
    run = trainer(strategy, devices, max_steps=STEPS, callbacks=[alignment, SaveRun(folder, alignment)])
    run.fit(classifier(), samples(PER_RANK if devices == WORLD else WORLD * PER_RANK))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, the global batch at each step."""
    folder = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit_with_alignment(DFAStrategy(seed=3), folder, devices=1)
    finally:
        torch.set_num_threads(threads)
    return folder


def _fsdp_alignment_rank(rank: int, folder: Path) -> None:
    fit_with_alignment(DFAFSDPStrategy(seed=3, auto_wrap_policy={nn.Sequential}), folder)


def _ddp_alignment_rank(rank: int, folder: Path) -> None:
    fit_with_alignment(DFADDPStrategy(seed=3), folder)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp-alignment")
    assert fork_ranks(_fsdp_alignment_rank, folder) == [0] * WORLD
    return folder


def assert_same_rows(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert [row.keys() for row in got] == [row.keys() for row in want]
    for mine, theirs in zip(got, want):
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-6)


def test_alignment_under_fsdp_equals_one_process_on_the_global_batch(fsdp_run, one_process):
    want = torch.load(one_process / "alignment0.pt")
    assert len(want) == STEPS and "alignment/blocks.0" in want[0]
    for rank in range(WORLD):
        assert_same_rows(torch.load(fsdp_run / f"alignment{rank}.pt"), want)


def test_alignment_under_fsdp_leaves_the_training_step_as_it_was(fsdp_run, one_process):
    got, want = torch.load(fsdp_run / "weights.pt"), torch.load(one_process / "weights.pt")
    assert got.keys() == want.keys()
    for name, weight in want.items():
        torch.testing.assert_close(got[name], weight, msg=name)


def test_alignment_under_ddp_equals_one_process_on_the_global_batch(tmp_path, one_process):
    assert fork_ranks(_ddp_alignment_rank, tmp_path) == [0] * WORLD
    want = torch.load(one_process / "alignment0.pt")
    for rank in range(WORLD):
        assert_same_rows(torch.load(tmp_path / f"alignment{rank}.pt"), want)


# ---------------------------------------------------------------------------------------------- CausalLM samples
class DigitTokenizer:
    """Text as token ids (one per character) and back: enough for ``generate_sample``."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text: str, return_tensors: str = "pt") -> dict[str, Tensor]:
        return {"input_ids": torch.tensor([[1 + ord(char) % 63 for char in text]])}

    def __len__(self) -> int:
        return 64

    def decode(self, ids: Tensor, skip_special_tokens: bool = False) -> str:
        return " ".join(str(int(i)) for i in ids)


class Tokens(pl.LightningDataModule):
    tokenizer = DigitTokenizer()

    def _loader(self) -> DataLoader:
        return DataLoader(
            torch.randint(0, 64, (WORLD * PER_RANK, 13), generator=torch.Generator().manual_seed(2)),
            batch_size=PER_RANK,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


def language_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(config=GPT2, vocab_size=64, sample_prompt="DFA", sample_tokens=8)


def _fsdp_sample_rank(rank: int, folder: Path) -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    strategy = DFAFSDPStrategy(auto_wrap_policy={GPT2Block})
    run = trainer(strategy, max_steps=1, num_sanity_val_steps=0, default_root_dir=str(folder))
    run.fit(language_model(), datamodule=Tokens())
    run.save_checkpoint(folder / "fit.ckpt")


def test_a_sample_under_fsdp_is_generated_from_the_whole_weights(tmp_path):
    assert fork_ranks(_fsdp_sample_rank, tmp_path) == [0] * WORLD
    model = language_model()
    model.load_state_dict(torch.load(tmp_path / "fit.ckpt", weights_only=False)["state_dict"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = model.generate_sample(DigitTokenizer())
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "samples.txt").read_text().splitlines()[1:] == [want]


def _dtensor_run(port: int, folder: str) -> None:
    import warnings

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = classifier()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    alignment = Alignment(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(DFAStrategy(seed=3), devices=1, max_steps=STEPS, callbacks=[alignment]).fit(model, samples(PER_RANK))
    messages = [str(w.message) for w in caught if str(w.message).startswith("Alignment")]
    torch.save({"messages": messages, "rows": alignment.history}, Path(folder) / "dtensor.pt")
    dist.destroy_process_group()


def test_alignment_with_dtensor_parameters_warns_once_and_logs_nothing(tmp_path):
    child = mp.get_context("fork").Process(target=_dtensor_run, args=(free_port(), str(tmp_path)))
    child.start()
    child.join(DEADLINE_S)
    assert child.exitcode == 0
    result = torch.load(tmp_path / "dtensor.pt")
    assert result["rows"] == []
    assert len(result["messages"]) == 1 and "DTensors" in result["messages"][0]
