"""The Lightning layer: strategies, the DFA callback, configure_dfa, DDP and checkpoints."""

import pickle
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.strategies import StrategyRegistry

import lightning_dfa  # noqa: F401  (registers the strategies)
from lightning_dfa import DFA, DFAConfig, DFADDPStrategy, DFAFSDPStrategy, DFAStrategy, FeedbackEngine
from lightning_dfa.data import DigitsDataModule
from lightning_dfa.models import MLPClassifier


def trainer(**kwargs):
    return quiet_trainer(**{"max_steps": 3, "num_sanity_val_steps": 0, "limit_val_batches": 0, **kwargs})


class Recorder(pl.Callback):
    """Keeps the DFA engine and the gradients of the last training step."""

    def on_after_backward(self, trainer, pl_module):
        self.dfa = trainer.strategy.dfa.engine if hasattr(trainer.strategy, "dfa") else None
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_strategies_are_registered_by_name():
    for name in ("dfa", "dfa_ddp", "dfa_ddp_spawn"):
        assert name in StrategyRegistry.available_strategies()
    assert isinstance(trainer(strategy="dfa").strategy, DFAStrategy)
    assert isinstance(trainer(strategy="dfa_ddp_spawn", devices=2).strategy, DFADDPStrategy)


def test_dfa_strategy_trains_with_the_blocks_from_configure_dfa():
    recorder = Recorder()
    model = MLPClassifier(hidden=16, depth=2)
    before = model.blocks[0][0].weight.detach().clone()
    trainer(strategy="dfa", callbacks=[recorder]).fit(model, datamodule=DigitsDataModule())
    assert recorder.dfa.points == ["blocks.0", "blocks.1"] and recorder.dfa.output == "head"
    assert recorder.dfa.mode == "dfa" and recorder.dfa.projector is not None
    assert not torch.equal(before, model.blocks[0][0].weight)
    assert not model.blocks[0][0]._forward_hooks, "hooks are removed when fit ends"


def test_strategy_arguments_override_configure_dfa():
    recorder = Recorder()
    strategy = DFAStrategy(mode="backprop", seed=7)
    trainer(strategy=strategy, callbacks=[recorder]).fit(MLPClassifier(hidden=16, depth=2), DigitsDataModule())
    assert (recorder.dfa.mode, recorder.dfa.config.seed, recorder.dfa.points) == (
        "backprop",
        7,
        ["blocks.0", "blocks.1"],
    )


class SeededMLP(MLPClassifier):
    """An MLP whose configure_dfa() sets a seed besides its blocks and error point."""

    def configure_dfa(self):
        return {**super().configure_dfa(), "seed": 3}


def test_strategy_blocks_override_only_the_blocks_of_configure_dfa():
    recorder = Recorder()
    strategy = DFAStrategy(blocks=["blocks.1"])
    trainer(strategy=strategy, callbacks=[recorder]).fit(SeededMLP(hidden=16, depth=2), DigitsDataModule())
    assert recorder.dfa.points == ["blocks.1"]
    assert (recorder.dfa.output, recorder.dfa.config.seed) == ("head", 3), "the other settings: configure_dfa()'s"
    assert "blocks.0.0.weight" not in recorder.grads, "modules below the first point get no gradient"
    assert recorder.grads["blocks.1.0.weight"].abs().sum() > 0


def test_the_dfa_callback_merges_its_settings_over_configure_dfa():
    dfa = DFA(seed=5)
    trainer(strategy="auto", callbacks=[dfa]).fit(SeededMLP(hidden=16, depth=2), DigitsDataModule())
    assert (dfa.config.seed, dfa.config.blocks, dfa.config.output) == (5, "blocks.*", "head")


def test_configure_dfa_may_return_a_dfa_config():
    class Configured(MLPClassifier):
        def configure_dfa(self):
            return DFAConfig(blocks="blocks.0", output="head", seed=9)

    dfa = DFA()
    trainer(strategy="auto", callbacks=[dfa]).fit(Configured(hidden=16, depth=2), DigitsDataModule())
    assert (dfa.engine.points, dfa.config.seed) == (["blocks.0"], 9)


def test_dfa_callback_works_under_another_strategy():
    dfa = DFA(blocks="blocks.*", output="head")
    model = MLPClassifier(hidden=16, depth=2)
    trainer(strategy="auto", callbacks=[dfa]).fit(model, datamodule=DigitsDataModule())
    assert list(dfa.engine.layout) == ["blocks.0", "blocks.1"]
    assert dfa.engine.model is None, "detached at the end of fit"


def test_dfa_strategy_with_a_dfa_callback_is_an_error():
    with pytest.raises(ValueError, match="already applies DFA; remove the DFA callback"):
        trainer(strategy="dfa", callbacks=[DFA(blocks="blocks.*", output="head")]).fit(
            MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule()
        )


def test_configure_dfa_with_a_bad_return_is_an_error():
    class Bad(MLPClassifier):
        def configure_dfa(self):
            return ["blocks.*"]

    with pytest.raises(TypeError, match=r"Bad.configure_dfa\(\) must be a DFAConfig or a dict"):
        trainer(strategy="dfa").fit(Bad(hidden=16, depth=2), datamodule=DigitsDataModule())


def test_dfa_strategy_refuses_several_devices():
    with pytest.raises(ValueError, match="use strategy='dfa_ddp'"):
        trainer(strategy="dfa", devices=2).fit(MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule())


def test_checkpoint_resume_restores_the_same_projection(tmp_path):
    first = Recorder()
    run = trainer(strategy="dfa", callbacks=[first], max_steps=2)
    run.fit(MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule())
    path = tmp_path / "last.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]["lightning_dfa.DFA"]
    assert saved["seed"] == 0 and set(saved["layout"]) == {"blocks.0", "blocks.1"}
    assert not any(torch.is_tensor(v) and v.numel() > 1 for v in saved["projector"].values()), "no matrix saved"

    resumed = Recorder()
    trainer(strategy="dfa", callbacks=[resumed], max_steps=3).fit(
        MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule(), ckpt_path=path
    )
    torch.testing.assert_close(resumed.dfa.projector.materialize(), first.dfa.projector.materialize(), rtol=0, atol=0)


def test_resuming_with_another_seed_is_an_error(tmp_path):
    run = trainer(strategy="dfa", max_steps=1)
    run.fit(MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule())
    run.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="resume with seed=0"):
        trainer(strategy=DFAStrategy(seed=1), max_steps=2).fit(
            MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "last.ckpt"
        )


class RankDump(pl.Callback):
    """Writes each rank's projection and post-all-reduce gradients of the first step to disk."""

    def __init__(self, folder):
        self.folder = folder

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 0:
            state = {
                "projection": trainer.strategy.dfa.engine.projector.materialize(),
                "grads": {n: p.grad.clone() for n, p in pl_module.named_parameters()},
            }
            with open(Path(self.folder) / f"rank{trainer.global_rank}.pkl", "wb") as file:
                pickle.dump(state, file)


@pytest.mark.slow
def test_ddp_spawn_gives_every_rank_the_same_projection_and_gradients(tmp_path):
    run = trainer(strategy="dfa_ddp_spawn", devices=2, callbacks=[RankDump(str(tmp_path))], max_steps=2)
    run.fit(MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule(batch_size=16))
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in (0, 1)]
    torch.testing.assert_close(ranks[0]["projection"], ranks[1]["projection"], rtol=0, atol=0)
    for name, grad in ranks[0]["grads"].items():
        torch.testing.assert_close(grad, ranks[1]["grads"][name])
        assert grad.abs().sum() > 0, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dfa_strategy_trains_on_cuda():
    recorder = Recorder()
    trainer(strategy="dfa", accelerator="cuda", devices=1, callbacks=[recorder]).fit(
        MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule()
    )
    assert recorder.grads["blocks.0.0.weight"].is_cuda
    assert next(recorder.dfa.projector.buffers()).is_cuda


class ManualMLP(MLPClassifier):
    """Manual optimisation: records the batch, the initial weights and the gradients of its one step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.initial = {k: v.clone() for k, v in self.state_dict().items()}

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))
        self.seen = (batch, {n: p.grad.clone() for n, p in self.named_parameters()})
        optimizer.step()


def test_manual_optimisation_gets_the_engine_gradients():
    model = ManualMLP(hidden=16, depth=2)
    trainer(strategy="dfa", max_steps=1).fit(model, datamodule=DigitsDataModule())
    (x, y), lightning_grads = model.seen

    reference = MLPClassifier(hidden=16, depth=2)
    reference.load_state_dict(model.initial)
    FeedbackEngine(blocks="blocks.*", output="head").attach(reference)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(lightning_grads[name], param.grad, msg=name)


class LazyMLP(MLPClassifier):
    """Builds its blocks in configure_model(), as Lightning recommends for large models."""

    def __init__(self):
        super().__init__(hidden=16, depth=2)
        del self.blocks

    def configure_model(self):
        if not hasattr(self, "blocks"):
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(a, 16), torch.nn.Tanh()) for a in (64, 16)
            )


def test_dfa_attaches_after_configure_model():
    recorder = Recorder()
    trainer(strategy="dfa", callbacks=[recorder]).fit(LazyMLP(), datamodule=DigitsDataModule())
    assert recorder.dfa.points == ["blocks.0", "blocks.1"]
    assert recorder.grads["blocks.0.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("strategy", [DFAStrategy, DFADDPStrategy, DFAFSDPStrategy])
def test_every_strategy_takes_every_dfa_setting_and_passes_the_rest_to_lightning(strategy):
    lightning_only = {"DFAStrategy": {}, "DFADDPStrategy": {"find_unused_parameters": True}}
    extra = lightning_only.get(strategy.__name__, {"sharding_strategy": "NO_SHARD"})
    made = strategy(backprop_top=1, error_rows=1, embeddings="first_block", **extra)
    assert made._dfa_settings == {"backprop_top": 1, "error_rows": 1, "embeddings": "first_block"}  # noqa: SLF001


def test_dfa_ddp_strategy_trains_with_a_dfa_setting_given_as_keyword():
    recorder = Recorder()
    strategy = DFADDPStrategy(backprop_top=1, process_group_backend="gloo")
    trainer(strategy=strategy, devices=1, callbacks=[recorder], max_steps=1).fit(
        MLPClassifier(hidden=16, depth=2), datamodule=DigitsDataModule()
    )
    assert recorder.dfa.points == ["blocks.0"] and recorder.dfa.backprop_points == ["blocks.1"]


@pytest.mark.parametrize("takes_settings", [DFA, DFAStrategy, DFADDPStrategy, DFAFSDPStrategy])
def test_the_command_line_lists_every_dfa_setting_of(takes_settings):
    parser = LightningArgumentParser()
    parser.add_class_arguments(takes_settings, "init")
    defaults = parser.get_defaults()["init"]
    missing = [name for name in DFAConfig.names() if name not in defaults]
    assert not missing, f"{takes_settings.__name__} lacks the DFA settings {missing}"
    assert all(defaults[name] is None for name in DFAConfig.names()), "None means: not given"
