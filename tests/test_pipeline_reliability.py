"""The DFA pipeline's failure modes: non-finite steps, a failing or silent stage, checkpoints and exact resume."""

from __future__ import annotations

import pytest
import torch
from pipeline_ranks import (
    SETTINGS,
    batches,
    checkpoint_worker,
    failing_worker,
    frozen_worker,
    mlp,
    nonfinite_worker,
    reference,
    replicas_worker,
    spawn,
    uneven_worker,
)
from torch import nn

from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.pipeline.checkpoint import load_named_optimizer_state, unsplit_state_dict

pytestmark = pytest.mark.slow
STAGES = 2


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite")
    assert spawn(nonfinite_worker, (str(out),), world=STAGES) == [0] * STAGES
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(STAGES)]


def test_a_nan_error_skips_the_step_on_every_stage(nonfinite):
    for result in nonfinite:
        assert result["skipped"] == [True, False]
        assert result["unchanged"] and result["grads_cleared"]


def test_a_nan_error_with_nonfinite_stop_raises_on_every_stage(nonfinite):
    for result in nonfinite:
        assert result["stop"] is not None and "NaN or inf" in result["stop"]


@pytest.mark.parametrize("how", ["raise", "silent"])
def test_a_failing_stage_makes_the_others_raise_within_the_timeout(tmp_path, how):
    timeout = 3.0
    spawn(failing_worker, (str(tmp_path), how, timeout), world=STAGES, deadline_s=60)
    result = torch.load(tmp_path / "0.pt", weights_only=False)
    assert result["outcome"].startswith("StageFailure: Pipeline stage 0: another stage failed or did not answer")
    assert result["seconds"] < timeout + 10, result


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints")
    assert spawn(checkpoint_worker, (str(out), 2, 2, False), world=STAGES) == [0] * STAGES
    assert spawn(checkpoint_worker, (str(out), 2, 2, True), world=STAGES) == [0] * STAGES  # a fresh process group
    return out


def test_resume_from_stage_checkpoints_is_bitwise(checkpoints):
    for rank in range(STAGES):
        straight = torch.load(checkpoints / f"straight-{rank}.pt")
        resumed = torch.load(checkpoints / f"resumed-{rank}.pt")
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_stage_checkpoints_load_into_the_unsplit_model_and_train_on_as_one_process(checkpoints):
    stages = [torch.load(checkpoints / f"stage-{rank}.pt", weights_only=False) for rank in range(STAGES)]
    whole = unsplit_state_dict(stages)
    model = mlp()
    model.load_state_dict(whole["model"])
    engine = FeedbackEngine(**SETTINGS)
    engine.load_state_dict(whole["feedback"])
    engine.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    load_named_optimizer_state(optimizer, model, whole["optimizer"])
    engine.scale_updates(optimizer)
    for x, y in batches(4)[2:]:  # the two steps after the checkpoint, in two microbatches as the pipeline ran them
        for xm, ym in zip(x.chunk(2), y.chunk(2)):
            (nn.functional.cross_entropy(model(xm), ym) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    straight = {}
    for rank in range(STAGES):
        straight.update(torch.load(checkpoints / f"straight-{rank}.pt"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-12)


def test_uneven_microbatches_and_a_changed_batch_size_are_refused_with_the_fix(tmp_path):
    assert spawn(uneven_worker, (str(tmp_path),), world=1) == [0]
    uneven, even, smaller = torch.load(tmp_path / "0.pt")
    assert "Microbatch 1 has shapes [(3, 6)], microbatch 0 [(4, 6)]" in uneven and "drop_last=True" in uneven
    assert even is None
    assert "the first step's [(4, 6)]" in smaller


def test_a_frozen_block_on_a_stage_is_left_alone_and_the_others_train(tmp_path):
    assert spawn(frozen_worker, (str(tmp_path),), world=STAGES) == [0] * STAGES
    trained = {}
    for rank in range(STAGES):
        trained.update(torch.load(tmp_path / f"{rank}.pt"))
    assert trained == {name: not name.startswith("1.") for name in trained}


def test_two_replicas_of_a_two_stage_pipeline_train_as_one_process_on_the_whole_batch(tmp_path):
    assert spawn(replicas_worker, (str(tmp_path), 3), world=4) == [0] * 4
    expected = reference(3, 4)["params"]  # one process: the batch in 4 microbatches (2 per replica)
    for replica in range(2):
        got = {}
        for stage in range(2):
            got.update(torch.load(tmp_path / f"{2 * replica + stage}.pt"))
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12, msg=f"replica {replica} {name}")


@pytest.mark.parametrize(
    "message",
    [
        "[../gloo/transport/tcp/pair.cc:534] Timed out waiting 3000ms for recv operation to complete",
        "Application timeout caused pair closure",
        "Connection reset by peer",
        "Connection closed by peer [127.0.0.1]:29500",
    ],
)
def test_what_gloo_says_of_a_gone_or_silent_peer_is_a_stage_failure(message):
    from lightning_dfa.pipeline.schedule import _peer_failure

    assert _peer_failure(RuntimeError(message))


def test_another_runtime_error_is_not_a_stage_failure():
    from lightning_dfa.pipeline.schedule import _peer_failure

    assert not _peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)"))
