"""Each private or unstable ``torch.distributed.pipelining`` use of ``lightning_dfa.pipeline._compat``, pinned."""

from __future__ import annotations

import inspect
from datetime import timedelta

import torch.distributed.distributed_c10d as c10d
from torch.distributed.pipelining import schedules
from torch.distributed.pipelining.schedules import PipelineScheduleSingle
from torch.distributed.pipelining.stage import _PipelineStageBase

from lightning_dfa.pipeline import _compat


def test_sorted_batch_p2p_and_its_wait_take_no_ops_quietly():
    assert _compat.batch_p2p([], desc="fwd_recv") == {}
    _compat.wait_p2p({})
    assert "desc" in inspect.signature(schedules._sorted_batch_p2p).parameters
    assert list(inspect.signature(schedules._wait_batch_p2p).parameters) == ["work"]


def test_a_single_stage_schedule_implements_step_microbatches_with_these_arguments():
    method = getattr(PipelineScheduleSingle, _compat.STEP_MICROBATCHES)
    assert getattr(method, "__isabstractmethod__", False)
    assert list(inspect.signature(method).parameters) == [
        "self", "arg_mbs", "kwarg_mbs", "target_mbs", "losses", "return_outputs", "loss_kwargs",
    ]  # fmt: skip


def test_the_schedule_checks_microbatches_and_initializes_its_stage_by_these_names():
    assert list(inspect.signature(PipelineScheduleSingle._check_inputs).parameters)[1:] == [
        "arg_mbs", "kwarg_mbs", "target_mbs", "losses",
    ]  # fmt: skip
    assert list(inspect.signature(PipelineScheduleSingle._initialize_stage).parameters)[1:4] == [
        "args", "kwargs", "target",
    ]  # fmt: skip
    assert "self._stage = stage" in inspect.getsource(PipelineScheduleSingle.__init__)
    assert "self._n_microbatches = n_microbatches" in inspect.getsource(schedules._PipelineSchedule.__init__)


def test_a_stage_caches_each_microbatch_output_in_fwd_cache():
    assert "self.fwd_cache[fwd_chunk_id] = (" in inspect.getsource(_PipelineStageBase.forward_one_chunk)


def test_without_a_loss_a_stage_issues_no_backward_op():
    for method in (_PipelineStageBase.get_bwd_recv_ops, _PipelineStageBase.get_bwd_send_ops):
        assert "if not self.has_backward" in inspect.getsource(method)


def test_a_new_gloo_group_without_timeout_waits_the_backend_default_not_the_default_group():
    assert c10d._get_default_timeout("gloo") == timedelta(minutes=30)
    assert "timeout = _get_default_timeout(backend)" in inspect.getsource(c10d._new_group_with_tag)
