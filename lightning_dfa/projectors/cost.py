"""What a projection costs: frames, time and energy on an OPU, and time and energy on the current device.

Optical model: every binary input frame is displayed twice, alone and with the anchor (``x`` and ``x + r``),
and each display is one camera frame of ``frame_time`` seconds whatever its size. A vector therefore takes
``2 * binary_frames(encoding)`` frames (4 for the default encoding, one bit plane per sign, as for ternary),
times the number of device passes when the sizes exceed the device (input and output tiles). The anchor's
own intensity is measured once per device pass and per run (``anchor_frames``). Time is frames times
frame time on one device; energy is that time times the device's power (30 W by default).

Electronic model: the measured wall time of the same projection on the current device (with CUDA
synchronisation), times an assumed power draw: :data:`DEFAULT_POWER_W` (a documented guess of the
board's or package's power under a matmul load: 700 W for an H100/H200 SXM GPU, 400 W for an A100,
300 W for other CUDA GPUs, 65 W for a CPU package, 20 W for Apple MPS). Pass ``power_w`` for yours.

Example::

    >>> cost = optical_cost(2048, 4096, 49152)
    >>> cost.frames, cost.time_s, cost.energy_j
    (8192, 4.096, 122.88)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_dfa.projectors.encoding import DEFAULT_BITS, DEFAULT_ENCODING, binary_frames

#: Device limits of an OPU (LightOn Aurora-class): DMD pixels, camera pixels, seconds per frame, watts.
MAX_INPUT = 1140 * 912
MAX_OUTPUT = 1920 * 1080
FRAME_TIME = 0.5e-3
OPU_POWER_W = 30.0

#: Assumed electrical power of electronic devices under a matmul load, watts (see the module doc).
DEFAULT_POWER_W = {"h100": 700.0, "h200": 700.0, "a100": 400.0, "cuda": 300.0, "cpu": 65.0, "mps": 20.0}


@dataclass(frozen=True)
class OpticalCost:
    """Frames, seconds and joules of ``vectors`` projections on the OPU."""

    vectors: int
    frames_per_vector: int
    tiles: tuple[int, int]
    frames: int
    time_s: float
    energy_j: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ElectronicCost:
    """Measured seconds and estimated joules of ``vectors`` projections on an electronic device."""

    vectors: int
    device: str
    time_s: float
    power_w: float
    energy_j: float

    def as_dict(self) -> dict:
        return asdict(self)


def device_tiles(
    in_features: int,
    out_features: int,
    anchor_pixels: int = 0,
    max_input: int = MAX_INPUT,
    max_output: int = MAX_OUTPUT,
) -> tuple[int, int]:
    """Device passes needed along the input and the output: ``(ceil(d_e / free DMD pixels), ceil(d_fb / camera))``."""
    free = max_input - anchor_pixels
    if free < 1:
        raise ValueError(f"The anchor ({anchor_pixels} pixels) leaves no room on a {max_input}-pixel input device.")
    return -(-in_features // free), -(-out_features // max_output)


def frames_per_vector(encoding: str | None = DEFAULT_ENCODING, bits: int = DEFAULT_BITS) -> int:
    """Camera frames per error vector on one device pass: each binary frame alone and with the anchor."""
    return 2 * binary_frames(encoding, bits)


def optical_cost(
    vectors: int,
    in_features: int,
    out_features: int,
    *,
    encoding: str | None = DEFAULT_ENCODING,
    bits: int = DEFAULT_BITS,
    anchor_pixels: int = 0,
    anchor_frames: bool = False,
    frame_time: float = FRAME_TIME,
    power_w: float = OPU_POWER_W,
    max_input: int = MAX_INPUT,
    max_output: int = MAX_OUTPUT,
) -> OpticalCost:
    """The OPU's cost of projecting ``vectors`` errors of size ``in_features`` to ``out_features`` (module doc).

    ``anchor_frames=True`` adds the one-off anchor measurement (one frame per device pass).
    """
    tiles = device_tiles(in_features, out_features, anchor_pixels, max_input, max_output)
    per_vector = frames_per_vector(encoding, bits)
    frames = vectors * per_vector * tiles[0] * tiles[1] + (tiles[0] * tiles[1] if anchor_frames else 0)
    seconds = frames * frame_time
    return OpticalCost(vectors, per_vector, tiles, frames, seconds, seconds * power_w)


def default_power_w(device: torch.device | str) -> float:
    """The assumed power of ``device`` (:data:`DEFAULT_POWER_W`), by GPU name when it is a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return next((w for key, w in DEFAULT_POWER_W.items() if key in name), DEFAULT_POWER_W["cuda"])
    return DEFAULT_POWER_W.get(device.type, DEFAULT_POWER_W["cpu"])


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, synchronising CUDA around each call."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def electronic_cost(
    vectors: int,
    in_features: int,
    out_features: int,
    *,
    projector: nn.Module | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    power_w: float | None = None,
) -> ElectronicCost:
    """Measure one projection of ``vectors`` random errors on ``device``; energy = time x assumed power.

    ``projector`` defaults to the dense :class:`Gaussian` when its matrix takes at most 1 GiB, else
    :class:`SeededGaussian` (which draws its matrix on every call, so it is the slower reference).
    """
    from lightning_dfa.projectors.gaussian import Gaussian
    from lightning_dfa.projectors.seeded import SeededGaussian

    if projector is None:
        kind = Gaussian if in_features * out_features * 4 <= 1 << 30 else SeededGaussian
        projector = kind(in_features, out_features)
    projector = projector.to(device)
    error = torch.randn(vectors, in_features, device=device, dtype=dtype)
    with torch.no_grad():
        seconds = time_call(lambda: projector(error), device, repeats)
    power = default_power_w(device) if power_w is None else float(power_w)
    return ElectronicCost(vectors, str(torch.device(device)), seconds, power, seconds * power)


def equivalent_teraops(vectors: int, in_features: int, out_features: int, seconds: float) -> float:
    """Dense-equivalent throughput: ``2 N d_e d_fb`` operations per ``seconds``, in TeraOPS."""
    return 2.0 * vectors * in_features * out_features / seconds / 1e12
