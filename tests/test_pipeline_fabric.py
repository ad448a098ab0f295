"""A tiny GPT-2 trained through the Fabric pipeline path with 2 stages equals one process with the same seed."""

from __future__ import annotations

import math

import pytest

from lightning_dfa.pipeline.gpt2 import parse, run

pytestmark = pytest.mark.slow
OPTIONS = ["--steps", "12", "--microbatches", "2", "--batch-size", "4", "--block-size", "16", "--val-batches", "2",
           "--log-every", "100", "--timeout", "60"]  # fmt: skip


@pytest.fixture(scope="module")
def one_process():
    return run(parse([*OPTIONS, "--pipeline-stages", "0"]))


def test_two_fabric_stages_reach_the_validation_perplexity_of_one_process(one_process):
    two = run(parse([*OPTIONS, "--pipeline-stages", "2"]))
    assert two["stages"] == 2 and one_process["stages"] == 0
    assert math.isclose(two["val_ppl"], one_process["val_ppl"], rel_tol=1e-5), (two["val_ppl"], one_process["val_ppl"])
    for got, expected in zip(two["train_loss"], one_process["train_loss"]):
        assert math.isclose(got, expected, rel_tol=1e-5)
    assert one_process["train_loss"][-1] < one_process["train_loss"][0]  # it learns


def test_a_fabric_run_resumed_from_its_stage_checkpoints_continues_bitwise(tmp_path):
    straight = run(parse([*OPTIONS, "--pipeline-stages", "2", "--out", str(tmp_path), "--save-at", "6"]))
    resumed = run(parse([*OPTIONS, "--pipeline-stages", "2", "--resume", str(tmp_path / "checkpoint")]))
    assert resumed["train_loss"] == straight["train_loss"][6:]
    assert resumed["val_ppl"] == straight["val_ppl"]


def test_two_replicas_of_two_fabric_stages_train_as_one_process_and_resume(one_process, tmp_path):
    options = [*OPTIONS, "--microbatches", "1", "--replicas", "2"]
    reference = run(parse([*options, "--pipeline-stages", "0"]))
    replicated = run(parse([*options, "--pipeline-stages", "2", "--out", str(tmp_path), "--save-at", "6"]))
    assert math.isclose(replicated["val_ppl"], reference["val_ppl"], rel_tol=1e-5)
    assert reference["val_ppl"] == one_process["val_ppl"]  # the same 2 microbatches of each batch, in one process
    resumed = run(parse([*options, "--pipeline-stages", "2", "--resume", str(tmp_path / "checkpoint")]))
    assert resumed["val_ppl"] == replicated["val_ppl"]
