"""Splitting a model into pipeline stages at block boundaries, and each stage's projection columns (one process)."""

from __future__ import annotations

import pytest
import torch
from pipeline_ranks import Float64Gaussian, mlp
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_dfa.feedback import DFAConfig
from lightning_dfa.pipeline import StageProjection, split_model
from lightning_dfa.projectors import build_projector


def chained(model: nn.Module, stages: int, *inputs, **split):
    """The stages run one after the other in one process, as the pipeline runs them."""
    value = inputs
    for index in range(stages):
        value = (split_model(model, stages, index, **split)(*value),)
    return value[0]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=16, n_head=2, n_positions=16, vocab_size=37, tie_word_embeddings=False)
    return GPT2LMHeadModel(config).eval()


def test_the_stages_hold_the_model_parameters_once_under_their_own_names():
    model = mlp()
    names = [list(split_model(model, 3, i).state_dict()) for i in range(3)]
    assert names == [["0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias"], ["2.0.weight", "2.0.bias"],
                     ["3.0.weight", "3.0.bias", "4.weight", "4.bias"]]  # fmt: skip
    assert split_model(model, 3, 2).get_submodule("4") is model[4]  # the model's own modules, no copy


def test_a_child_between_two_blocks_runs_on_the_stage_of_the_block_before_it():
    model = mlp()
    model[1].requires_grad_(False)  # no longer a block for blocks="auto"
    stages = [split_model(model, 2, i) for i in range(2)]
    assert [s.points for s in stages] == [["0", "2"], ["3"]]
    assert stages[0].get_submodule("1") is model[1]
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(stages[1](stages[0](x)), model(x), rtol=0, atol=0)


def test_blocks_per_stage_sets_the_cut():
    assert split_model(mlp(), 2, 0, blocks_per_stage=[3, 1]).points == ["0", "1", "2"]


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_chained_stages_compute_the_model_output(stages):
    model = mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(chained(model, stages, x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_chained_gpt2_stages_compute_its_logits(stages):
    model = tiny_gpt2()
    ids = torch.randint(0, 37, (2, 9))
    torch.testing.assert_close(chained(model, stages, ids), model(ids).logits, rtol=0, atol=0)


def test_chained_llama_stages_compute_its_logits():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=37, max_position_embeddings=16)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 37, (2, 7))
    torch.testing.assert_close(chained(model, 2, ids), model(ids).logits, rtol=0, atol=0)


def test_a_weight_tied_across_stages_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=37))
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        split_model(model, 2, 0)
    split_model(model, 1, 0)  # one stage holds both ends of the tie


def test_a_model_of_unknown_structure_asks_for_its_chain():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4)) for _ in range(2))
            self.head = nn.Linear(4, 2)

    with pytest.raises(ValueError, match="chain=Chain"):
        split_model(Net(), 2, 0)


@pytest.mark.parametrize(
    "setting", [{"backprop_top": 1}, {"mode": "backprop"}, {"embeddings": True}, {"spatial_feedback": True}]
)
def test_settings_the_pipeline_does_not_split_are_refused(setting):
    with pytest.raises(ValueError, match="The DFA pipeline needs"):
        split_model(mlp(), 2, 0, DFAConfig(**setting))


def test_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError, match="5 stages need at least 5 blocks"):
        split_model(mlp(), 5, 0)


def test_the_output_point_must_be_after_the_blocks():
    with pytest.raises(ValueError, match="after the last block"):
        split_model(mlp(), 2, 0, DFAConfig(output="0.0"))


@pytest.mark.parametrize("kind", ["seeded", "gaussian", "structured", Float64Gaussian])
def test_a_stage_projects_its_columns_of_the_whole_projection(kind):
    full = build_projector(kind, 10, 1100, seed=4)
    part = StageProjection(full, slice(300, 1013))
    error = torch.randn(6, 10)
    whole = full(error)[:, 300:1013]
    if kind in ("seeded", "gaussian"):  # only the stage's columns are built: float32 sums may round differently
        reference = full.materialize()[:, 300:1013]
        assert torch.equal(part.matrix_columns(), reference)
        torch.testing.assert_close(part(error), whole, rtol=1e-5, atol=1e-6)
    else:  # any other projector runs whole and keeps its columns: what one process computes
        assert torch.equal(part(error), whole)


def test_only_seeded_and_dense_gaussians_build_just_their_columns():
    kinds = {k: StageProjection(build_projector(k, 4, 64, seed=0), slice(8, 16)).kind for k in ("seeded", "gaussian")}
    assert kinds == {"seeded": "seeded columns", "gaussian": "stored columns"}
    assert StageProjection(Float64Gaussian(4, 64), slice(8, 16)).kind == "sliced output"  # a subclass: its forward
