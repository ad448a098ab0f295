"""Each private API of another library that lightning_dfa uses (torch and transformers: lightning_dfa/_compat.py;
Lightning, W&B and jsonargparse: lightning_dfa/_lightning_compat.py) still does what the package relies on: an
upgrade that changes one fails here, by name."""

from __future__ import annotations

import inspect
from argparse import ArgumentError

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_dfa import _compat, _lightning_compat
from lightning_dfa.loggers import WandbLogger


def test_the_graph_task_id_is_minus_one_outside_backward_and_another_inside():
    seen = []
    x = torch.ones(2, requires_grad=True)
    x.register_hook(lambda grad: seen.append(_compat.current_graph_task_id()))
    (x * 2).sum().backward()
    assert _compat.current_graph_task_id() == -1 and seen and seen[0] != -1


def test_a_queued_backward_callback_runs_once_the_backward_pass_ends():
    order = []

    def hook(grad):
        _compat.queue_backward_callback(lambda: order.append("callback"))
        order.append("hook")

    x = torch.ones(2, requires_grad=True)
    x.register_hook(hook)
    (x * 2).sum().backward()
    assert order == ["hook", "callback"]


def test_fsdp_and_checkpoint_wrappers_keep_their_module_under_the_known_attributes():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    layer = nn.Linear(2, 2)
    assert getattr(checkpoint_wrapper(layer), _compat.WRAPPED_MODULE_ATTRIBUTES[1]) is layer
    assert FSDP_WRAPPED_MODULE == _compat.WRAPPED_MODULE_ATTRIBUTES[0]


def test_forward_hooks_lists_the_hooks_registered_on_a_module():
    def hook(*args):
        return None

    layer = nn.Linear(2, 2)
    layer.register_forward_hook(hook)
    assert _compat.forward_hooks(layer) == [hook]


@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_reentrant_checkpointing_reads_the_use_reentrant_hf_was_given(reentrant):
    lm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers 5.24+ (the older name is deprecated)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert _compat.hf_reentrant_checkpointing(lm.transformer.h[0]) is reentrant


def test_attached_trainer_is_none_before_the_module_is_attached_and_the_trainer_after():
    module = pl.LightningModule()
    assert _lightning_compat.attached_trainer(module) is None
    module.trainer = trainer = pl.Trainer(logger=False)
    assert _lightning_compat.attached_trainer(module) is trainer


@pytest.mark.parametrize("use", [True, False])
def test_sampler_ranks_follow_lightnings_distributed_sampler_setting(use):
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, use_distributed_sampler=use)
    assert _lightning_compat.sampler_ranks(trainer) == (
        {"num_replicas": 2, "rank": 0} if use else {"num_replicas": 1, "rank": 0}
    )


@pytest.mark.parametrize(("strategy", "spawns"), [("ddp_spawn", True), ("ddp", False)])
def test_launcher_spawns_reads_the_start_method_of_the_launcher(strategy, spawns):
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    assert _lightning_compat.launcher_spawns(trainer) is spawns


def test_subcommand_parsers_are_the_lightning_cli_parser_of_each_subcommand():
    from lightning.pytorch.cli import LightningCLI

    seen = {}

    class Probe(LightningCLI):
        def parse_arguments(self, parser, args):  # the parsers exist by now; stop before anything runs
            seen.update(_lightning_compat.subcommand_parsers(self))
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        Probe(pl.LightningModule, args=["fit"])
    assert {"fit", "validate", "test"} <= set(seen) and all(isinstance(p, ArgumentParser) for p in seen.values())


def test_lightnings_fsdp_setup_still_calls_the_setup_model_hook_dfa_fsdp_overrides():
    assert "self._setup_model(" in inspect.getsource(FSDPStrategy.setup)


def test_logging_muted_makes_log_a_no_op_and_gives_it_back():
    module = pl.LightningModule()
    with _lightning_compat.logging_muted(module):
        module.log("x", 1.0)  # would raise: no trainer attached
    assert module.log.__func__ is pl.LightningModule.log


def test_wrap_methods_wraps_one_object_and_not_its_class():
    class Thing:
        def act(self) -> str:
            return "done"

    thing = Thing()
    _lightning_compat.wrap_methods(thing, ["act", "absent"], lambda name, method: lambda: f"{name}: {method()}")
    assert thing.act() == "act: done" and Thing().act() == "done"


def test_our_wandb_logger_hands_wandb_init_no_anonymous_setting(tmp_path):
    logger = WandbLogger(project="p", save_dir=str(tmp_path))
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"
    assert not _lightning_compat.wandb_started(logger)


def test_parser_dests_lists_nested_options():
    parser = ArgumentParser()
    parser.add_argument("--trainer.max_steps", type=int)
    assert "trainer.max_steps" in _lightning_compat.parser_dests(parser)


def test_unknown_option_finds_the_key_in_jsonargparse_errors():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--trainer.max_steps", type=int)
    with pytest.raises(ArgumentError) as err:
        parser.parse_object({"trainer": {"max_stepz": 3}})
    assert _lightning_compat.unknown_option(str(err.value)) == (None, "trainer.max_stepz")
    assert _lightning_compat.unknown_option("some other error") is None
