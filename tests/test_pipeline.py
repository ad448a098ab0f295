"""The DFA pipeline equals the single-process feedback engine: P = 1..4 stages, M = 1, 4 microbatches, both orders."""

from __future__ import annotations

import pytest
import torch
from pipeline_ranks import CONFIGS, PROJECTORS, SETTINGS, exactness_worker, reference, spawn

STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One group of 4 forked ranks runs every configuration; each rank saves its stages' results."""
    out = tmp_path_factory.mktemp("pipeline")
    codes = spawn(exactness_worker, (str(out), STEPS), world=4, deadline_s=180)
    assert codes == [0, 0, 0, 0], f"ranks exited with {codes}"
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(4)]


def merged(runs, key, what):
    stages = 2 if key[0] == "projector" else key[0]
    found = {}
    for rank in range(stages):
        found.update(runs[rank][key][what])
    return found


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("key", CONFIGS, ids=[f"P{p}-M{m}-{o}" for p, m, o in CONFIGS])
def test_pipeline_equals_one_process(runs, key):
    stages, microbatches, _ = key
    expected = reference(STEPS, microbatches)
    for what in ("grads", "params"):
        got = merged(runs, key, what)
        assert sorted(got) == sorted(expected[what])  # the stages keep the unsplit model's names
        for name, value in expected[what].items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12, msg=f"{what} {name} {key}")


@pytest.mark.parametrize("stages,microbatches", [(p, m) for p in (2, 3, 4) for m in (1, 4)])
def test_gpipe_and_1f1b_orders_give_the_same_parameters(runs, stages, microbatches):
    one = merged(runs, (stages, microbatches, "1f1b"), "params")
    other = merged(runs, (stages, microbatches, "gpipe"), "params")
    for name in one:
        assert torch.equal(one[name], other[name]), name


@pytest.mark.parametrize("key", CONFIGS, ids=[f"P{p}-M{m}-{o}" for p, m, o in CONFIGS])
def test_no_point_to_point_op_goes_backward(runs, key):
    stages, microbatches, _ = key
    for rank in range(stages):
        ops = runs[rank][key]["p2p"]
        expected = [("recv", rank - 1)] * microbatches * (rank > 0) + [("send", rank + 1)] * microbatches * (
            rank < stages - 1
        )
        # Steps 2 and 3: one activation in from the stage below, one out to the stage above, per microbatch.
        assert sorted(ops) == sorted(expected * (STEPS - 1)), (rank, ops)


def test_the_counter_sees_the_gradient_sends_of_torch_backprop_schedule(runs):
    first, last = runs[0][("torch-1f1b", 2, 4)]["p2p"], runs[1][("torch-1f1b", 2, 4)]["p2p"]
    assert first.count(("recv", 1)) == 4 and last.count(("send", 0)) == 4  # gradients flowing back


@pytest.mark.parametrize("projector", PROJECTORS)
def test_each_projector_trains_the_pipeline_as_one_process(runs, projector):
    expected = reference(STEPS, 2, {**SETTINGS, "projector": projector})["params"]
    got = merged(runs, ("projector", projector), "params")
    # the structured and OPU projectors run whole on each stage: what one process computes, bit for bit; the
    # Gaussians multiply only their columns, in float32, which may round another way
    tolerance = {"rtol": 0, "atol": 1e-12} if projector in ("structured", "opu") else {"rtol": 1e-5, "atol": 1e-7}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, **tolerance, msg=name)
