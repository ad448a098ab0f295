"""The OPU emulator's fast paths compute the plain maths: few-pixel frames, grouped passes, the ideal reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_dfa.projectors import opu as opu_module
from lightning_dfa.projectors.encoding import encode
from lightning_dfa.projectors.opu import FRAME_CHUNK, OPU, add_frames_times


def softmax_minus_one_hot(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """A language model's output error: a positive part lit densely, a negative part of one pixel per row."""
    generator = torch.Generator().manual_seed(seed)
    error = torch.softmax(torch.randn(rows, width, generator=generator), 1)
    error[torch.arange(rows), torch.randint(0, width, (rows,), generator=generator)] -= 1
    return error


def test_frames_of_at_most_two_pixels_add_the_medium_rows_bit_for_bit_as_the_matmul():
    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(FRAME_CHUNK, 300, generator=generator) < 0.4
    few = torch.zeros(FRAME_CHUNK, 300, dtype=torch.bool)
    few[torch.arange(FRAME_CHUNK), torch.randint(0, 300, (FRAME_CHUNK,), generator=generator)] = True
    few[::3, 7] = True  # a second pixel in every third frame
    few[5] = False  # and a dark frame
    frames = torch.cat([dense, few])
    medium = torch.randn(300, 64, generator=generator)
    chunks = OPU(300, 32, camera=False)._few_pixel_chunks(frames)
    assert chunks[0] is None and chunks[1] is not None  # a matmul, then the medium's rows
    for first, rows in ((0, 300), (100, 250)):  # the whole medium, and one tile of it
        plain, fast = torch.zeros(2 * FRAME_CHUNK, 64), torch.zeros(2 * FRAME_CHUNK, 64)
        add_frames_times(plain, frames[:, first:rows], medium[first:rows])
        add_frames_times(fast, frames[:, first:rows], medium[first:rows], chunks, first)
        assert torch.equal(fast, plain)


def test_a_frame_of_three_pixels_takes_the_matmul():
    frames = torch.zeros(4, 50, dtype=torch.bool)
    frames[2, :3] = True
    assert OPU(50, 8)._few_pixel_chunks(frames) == [None]


@pytest.mark.parametrize(
    "settings",
    [
        {"tile": 128},  # several output tiles
        {"max_input": 400, "max_output": 64, "allow_tiling": True},  # several device input chunks
        {"encoding": "ternary", "tile": 128},
        {"encoding": None},
    ],
)
def test_grouped_passes_give_the_streamed_outputs_bit_for_bit(monkeypatch, settings):
    results = []
    for memory in (0.0, 1e9):  # every pass on its own, and all of a call's passes sharing each medium tile
        monkeypatch.setattr(opu_module, "GROUP_MEMORY", memory)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiling warning
            opu = OPU(1024, 300, seed=2, **settings)
        assert (opu._passes_per_group(torch.float32) >= 3) == (memory > 0)  # 600 vectors: 3 passes
        results.append([(opu(softmax_minus_one_hot(600, 1024, call)), dict(opu.stats)) for call in range(2)])
    for (streamed, streamed_stats), (grouped, grouped_stats) in zip(*results):
        assert torch.equal(grouped, streamed) and grouped_stats == streamed_stats


@pytest.mark.parametrize("bits", [1, 2])
def test_the_ideal_opu_projects_the_encoded_error_through_every_path(bits):
    """Several passes and groups, dense frames and one-pixel frames: still ``decode(frames) @ W``."""
    errors = softmax_minus_one_hot(600, 1024)
    opu = OPU(1024, 300, seed=4, camera=False, bits=bits, tile=128)
    out = opu(errors)  # first: the call chooses the anchor
    dither = opu._stream(opu_module._DITHER, errors.device, 0)  # the first call's dither stream
    reference = encode(errors, "bitplanes", bits=bits, dither=dither).decode() @ opu.ideal_matrix()
    assert torch.allclose(out, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))
