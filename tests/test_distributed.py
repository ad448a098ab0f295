"""Distributed DFA on CPU with gloo and two processes: DDP, Lightning's FSDP and torch's ``fully_shard`` (FSDP2)
each give the gradients of one process on the same global batch.

The ranks are forked (not spawned): the children inherit the imported libraries, so each run takes
well under a second. Rank ``r`` trains on rows ``r, r + 2, ...`` of the global batch (what
``DistributedSampler`` hands out without shuffling); the per-rank mean losses, averaged by the
all-reduce / reduce-scatter, are the single process's mean loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TinyMLP, quiet_trainer, tiny_gpt2
from forking import WORLD, free_port, torchrun_env
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFA, DFADDPStrategy, DFAFSDPStrategy
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.models import MLPClassifier
from lightning_dfa.strategies import outer_points

PER_RANK = 4


def global_batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * PER_RANK, 5, generator=generator), torch.randint(
        0, 3, (WORLD * PER_RANK,), generator=generator
    )


def rank_rows(rank: int) -> slice:
    """The rows of the global batch that ``DistributedSampler(shuffle=False)`` gives ``rank``."""
    return slice(rank, None, WORLD)


def classifier() -> MLPClassifier:
    torch.manual_seed(0)
    return MLPClassifier(in_features=5, hidden=7, depth=2, num_classes=3)


def single_process_grads(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Gradients of one process on the whole global batch, with DFA on ``blocks.*``."""
    x, y = global_batch()
    with FeedbackEngine(blocks="blocks.*", output="head", seed=seed).attach(model):
        F.cross_entropy(model(x), y).backward()
    return {name: param.grad for name, param in model.named_parameters()}


def fork_ranks(worker: Callable[..., None], *args: Any) -> None:
    """Run ``worker(rank, port, *args)`` in ``WORLD`` forked processes; raises if a rank fails."""
    mp.start_processes(_one_thread, args=(worker, free_port(), *args), nprocs=WORLD, start_method="fork")


def _one_thread(rank: int, worker: Callable[..., None], *args: Any) -> None:
    torch.set_num_threads(1)  # OpenMP's pool does not survive fork (see tests/forking.py)
    worker(rank, *args)


def trainer(**kwargs: Any) -> pl.Trainer:
    return quiet_trainer(**{"devices": WORLD, "max_steps": 1, **kwargs})


def loader() -> DataLoader:
    return DataLoader(TensorDataset(*global_batch()), batch_size=PER_RANK)


def assert_same_grads(got: dict[str, Tensor | None], want: dict[str, Tensor | None]) -> None:
    """Equal gradients; a parameter below the first block has none (FSDP reports zeros for it)."""
    assert set(got) == set(want)
    for name, grad in want.items():
        if grad is None:
            assert got[name] is None or not got[name].any(), name
            continue
        torch.testing.assert_close(got[name], grad, msg=name)
        assert grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------- strategy "dfa_fsdp"
def test_dfa_fsdp_by_name_is_lightnings_fsdp_and_puts_its_dfa_first_when_a_model_connects():
    fit = trainer(strategy="dfa_fsdp")
    assert isinstance(fit.strategy, DFAFSDPStrategy) and isinstance(fit.strategy, FSDPStrategy)
    model = MLPClassifier(in_features=5, hidden=7, depth=2, num_classes=3)
    model.trainer = fit
    fit.strategy.connect(model)  # what fit() does first, here without a process group
    assert isinstance(fit.callbacks[0], DFA) and fit.callbacks[0] is fit.strategy.dfa


def test_dfa_fsdp_passes_its_fsdp_arguments_to_lightning():
    strategy = DFAFSDPStrategy(seed=3, sharding_strategy="SHARD_GRAD_OP", auto_wrap_policy={nn.Sequential})
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert "auto_wrap_policy" in strategy.kwargs and strategy.kwargs["use_orig_params"]


class NamedLikeFSDP(nn.Module):
    """Keeps its module where torch's FSDP (1) does, to check the point names without a process group."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = inner


def test_outer_points_moves_points_out_to_their_fsdp_wrappers():
    model = TinyMLP()
    model.blocks[0] = NamedLikeFSDP(model.blocks[0])
    assert outer_points(model, ["blocks.0._fsdp_wrapped_module", "blocks.1"]) == ["blocks.0", "blocks.1"]


def test_a_feedback_point_inside_an_fsdp_unit_is_an_error():
    model = TinyMLP()
    model.blocks[0] = NamedLikeFSDP(model.blocks[0])
    with pytest.raises(ValueError, match="inside the FSDP unit 'blocks.0'.*auto_wrap_policy"):
        outer_points(model, "blocks.0._fsdp_wrapped_module.*")


class FSDPDump(pl.Callback):
    """Writes each rank's DFA settings, projection and full (unsharded, reduced) gradients of the first step."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        dfa = trainer.strategy.dfa.engine
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, with_grads=True):
            grads = {name: p.grad.clone() for name, p in pl_module.named_parameters()}
        state = {
            "settings": dfa.config.settings(),
            "points": dfa.points,
            "projection": dfa.projector.materialize(),
            "grads": {name.replace("_fsdp_wrapped_module.", ""): grad for name, grad in grads.items()},
        }
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            weights = {
                name.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                for name, p in pl_module.named_parameters()
            }
        path = Path(self.folder) / f"rank{trainer.global_rank}.pt"
        torch.save({**torch.load(path), "weights": weights}, path)


def _dfa_fsdp_rank(rank: int, port: int, folder: str) -> None:
    torchrun_env(rank, port)
    strategy = DFAFSDPStrategy(seed=3, nonfinite="skip", spatial_patch=3, auto_wrap_policy={nn.Sequential})
    trainer(strategy=strategy, callbacks=[FSDPDump(folder)]).fit(classifier(), loader())


@pytest.fixture(scope="module")
def dfa_fsdp_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """One two-rank ``Trainer(strategy=DFAFSDPStrategy(...))`` step on CPU, launched as torchrun would."""
    folder = tmp_path_factory.mktemp("dfa_fsdp")
    fork_ranks(_dfa_fsdp_rank, str(folder))
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.slow
def test_dfa_fsdp_builds_its_dfa_from_its_arguments_and_configure_dfa(dfa_fsdp_ranks):
    settings, points = dfa_fsdp_ranks[0]["settings"], dfa_fsdp_ranks[0]["points"]
    assert (settings["seed"], settings["nonfinite"], settings["spatial_patch"]) == (3, "skip", 3)
    assert settings["output"] == "head", "from configure_dfa()"
    assert points == ["blocks.0", "blocks.1"], "points named as in the unwrapped module"


@pytest.mark.slow
def test_dfa_fsdp_gives_every_rank_the_same_projection(dfa_fsdp_ranks):
    first, second = (rank["projection"] for rank in dfa_fsdp_ranks)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.slow
def test_dfa_fsdp_gradients_equal_a_single_process_on_the_global_batch(dfa_fsdp_ranks):
    want = single_process_grads(classifier(), seed=3)
    for rank in dfa_fsdp_ranks:
        assert_same_grads(rank["grads"], want)


@pytest.mark.slow
def test_dfa_fsdp_steps_the_points_and_the_head_at_their_scales_as_one_process_with_explicit_groups(dfa_fsdp_ranks):
    model = classifier()
    x, y = global_batch()
    scale, head = 0.1, 3.0  # lr_scale="auto" for three classes (capped); the default head_lr_scale
    blocks = [p for block in model.blocks for p in block.parameters()]
    groups = [{"params": blocks, "lr": 1e-3 * scale}, {"params": model.head.parameters(), "lr": 1e-3 * head}]
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    with FeedbackEngine(blocks="blocks.*", output="head", seed=3).attach(model):
        F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for rank in dfa_fsdp_ranks:
        for name, param in model.named_parameters():
            torch.testing.assert_close(rank["weights"][name], param.detach(), msg=name)


class TinyLM(pl.LightningModule):
    """A tiny GPT-2 whose blocks DFA finds with ``blocks="auto"`` (inside their FSDP wrappers under auto-wrap)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_gpt2()

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.model(batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tokens() -> Tensor:
    return torch.randint(0, 64, (WORLD * PER_RANK, 12), generator=torch.Generator().manual_seed(2))


def _gpt2_fsdp_rank(rank: int, port: int, folder: str) -> None:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torchrun_env(rank, port)
    strategy = DFAFSDPStrategy(blocks="auto", auto_wrap_policy={GPT2Block})
    loader = DataLoader(TensorDataset(tokens()), batch_size=PER_RANK)
    trainer(strategy=strategy, callbacks=[FSDPDump(folder)]).fit(TinyLM(), loader)


@pytest.mark.slow
def test_dfa_fsdp_puts_auto_blocks_at_their_fsdp_units_and_gives_single_process_gradients(tmp_path):
    fork_ranks(_gpt2_fsdp_rank, str(tmp_path))
    gpt2 = tiny_gpt2()
    with FeedbackEngine(blocks="auto").attach(gpt2):
        gpt2(tokens(), labels=tokens()).loss.backward()
    want = {f"model.{name}": param.grad for name, param in gpt2.named_parameters()}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["points"] == ["model.transformer.h.0", "model.transformer.h.1"]
        assert_same_grads(got["grads"], want)


def _fit_then_test_rank(rank: int, port: int, folder: str) -> None:
    torchrun_env(rank, port)
    model, run = classifier(), trainer(strategy="dfa_fsdp", max_steps=2)  # one FSDP unit: the whole module
    run.fit(model, loader())
    run.save_checkpoint(Path(folder) / "fit.ckpt")
    torch.save(run.test(model, loader(), verbose=False)[0], Path(folder) / f"test{rank}.pt")


@pytest.mark.slow
def test_dfa_fsdp_tests_after_fit_with_the_trained_weights(tmp_path):
    fork_ranks(_fit_then_test_rank, str(tmp_path))
    model = classifier()
    model.load_state_dict(torch.load(tmp_path / "fit.ckpt", weights_only=False)["state_dict"])
    x, y = global_batch()
    # Test metrics are logged with sync_dist: every rank reports the mean of the ranks' losses.
    want = torch.stack([F.cross_entropy(model(x[rank_rows(r)]), y[rank_rows(r)]) for r in range(WORLD)]).mean()
    for rank in range(WORLD):
        torch.testing.assert_close(torch.tensor(torch.load(tmp_path / f"test{rank}.pt")["test/loss"]), want)


# ---------------------------------------------------------------------------------------------- DDP
class DDPDump(pl.Callback):
    """Writes rank 0's gradients after the all-reduce of the first step."""

    def __init__(self, path: str) -> None:
        self.path = path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(
            1
        )  # in the forked ranks: see _one_thread (Lightning skips it when OMP_NUM_THREADS is set)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save({name: p.grad.clone() for name, p in pl_module.named_parameters()}, self.path)


@pytest.mark.slow
def test_dfa_ddp_gradients_equal_a_single_process_on_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    path = str(tmp_path / "rank0.pt")
    strategy = DFADDPStrategy(start_method="fork")
    trainer(strategy=strategy, callbacks=[DDPDump(path)]).fit(classifier(), loader())
    assert_same_grads(torch.load(path), single_process_grads(classifier()))


# ---------------------------------------------------------------------------------------------- torch FSDP2
def _fully_shard_rank(rank: int, port: int, folder: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = TinyMLP()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    x, y = global_batch()
    with FeedbackEngine(blocks="blocks.*", output="head").attach(model):
        F.cross_entropy(model(x[rank_rows(rank)]), y[rank_rows(rank)]).backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    torch.save(grads, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_fully_shard_gradients_equal_a_single_process_on_the_global_batch(tmp_path):
    fork_ranks(_fully_shard_rank, str(tmp_path))
    torch.manual_seed(0)
    want = single_process_grads(TinyMLP())
    for rank in range(WORLD):
        assert_same_grads(torch.load(tmp_path / f"rank{rank}.pt"), want)
