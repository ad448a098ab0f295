"""The optical and electronic cost model against hand-computed values."""

from __future__ import annotations

import time

import pytest
import torch

from lightning_dfa.projectors import OPU, SeededGaussian, electronic_cost, equivalent_teraops, optical_cost
from lightning_dfa.projectors.cost import DEFAULT_POWER_W, MAX_INPUT, MAX_OUTPUT, default_power_w, time_call


def test_ternary_projection_costs_four_frames_per_vector():
    cost = optical_cost(2048, 4096, 49152)
    assert (cost.frames_per_vector, cost.tiles, cost.frames) == (4, (1, 1), 8192)
    assert cost.time_s == pytest.approx(8192 * 0.5e-3) == pytest.approx(4.096)
    assert cost.energy_j == pytest.approx(4.096 * 30)


def test_bit_planes_cost_four_frames_per_bit_and_settings_scale_time_and_energy():
    cost = optical_cost(10, 512, 6144, encoding="bitplanes", bits=3, frame_time=1e-3, power_w=50.0)
    assert cost.frames == 10 * 2 * 2 * 3
    assert cost.time_s == pytest.approx(0.12) and cost.energy_j == pytest.approx(6.0)


def test_analog_reference_counts_two_frames_and_the_anchor_once():
    assert optical_cost(7, 10, 10, encoding=None).frames == 14
    assert optical_cost(7, 10, 10, anchor_frames=True).frames == 7 * 4 + 1


def test_sizes_past_one_device_multiply_the_frames():
    cost = optical_cost(1, 2 * MAX_INPUT, MAX_OUTPUT + 1, anchor_pixels=10)
    assert cost.tiles == (3, 2)  # 2 MAX_INPUT pixels do not fit in 2 passes once the anchor takes 10
    assert cost.frames == 4 * 6
    assert optical_cost(1, MAX_INPUT, MAX_OUTPUT).tiles == (1, 1)


def test_opu_counts_the_same_frames_as_the_cost_model():
    opu = OPU(50, 80, seed=0, camera=False, encoding="bitplanes", bits=2)
    opu(torch.randn(6, 50))
    assert opu.stats["frames"] == optical_cost(6, 50, 80, encoding="bitplanes", bits=2).frames


def test_unknown_encoding_is_an_error():
    with pytest.raises(ValueError, match="encoding must be one of"):
        optical_cost(1, 10, 10, encoding="quaternary")


def test_time_call_reports_the_median_wall_time():
    assert time_call(lambda: time.sleep(0.02), repeats=3, warmup=0) == pytest.approx(0.02, abs=0.015)


def test_electronic_cost_is_measured_time_times_the_assumed_power():
    cost = electronic_cost(64, 128, 256, power_w=100.0, repeats=2)
    assert cost.time_s > 0 and cost.energy_j == pytest.approx(cost.time_s * 100.0)
    default = electronic_cost(64, 128, 256, projector=SeededGaussian(128, 256), repeats=1)
    assert default.power_w == DEFAULT_POWER_W["cpu"] == default_power_w("cpu")


def test_equivalent_teraops_is_twice_the_multiply_adds_per_second():
    assert equivalent_teraops(2048, 50257, 49152, 1.0) == pytest.approx(2 * 2048 * 50257 * 49152 / 1e12)
