"""The OPU's camera: exposure and gain, shot and read noise, saturation, and analog-to-digital quantisation.

Intensities ``I`` (in the emulator's units, ``|R x|^2``) become photo-electrons ``I * gain``, where the
gain is set once by an automatic exposure (``OPU.calibrate``): the expected mean intensity of the
first frames, anchor included, fills ``exposure`` of the full well. Then:

* shot noise (Poisson, emulated by its Gaussian approximation ``N(λ, λ)``, exact in mean and
  variance; good above ~10 electrons) and read noise ``N(0, read_noise^2)`` electrons;
* saturation at ``full_well`` electrons: clipped and **counted** (:attr:`Reading.saturated`);
* an ADC of ``bit_depth`` bits over ``[0, full_well]`` (``None``: no quantisation);
* conversion back to intensity units (``/ gain``), which is what the retrieval sees.

``Camera(enabled=False)`` passes intensities through unchanged (an ideal detector).

Example::

    >>> cam = Camera(bit_depth=8, shot_noise=False, read_noise=0.0)
    >>> reading = cam.read(torch.tensor([0.5, 1.0, 100.0]), gain=1000.0)
    >>> reading.saturated        # 100 * 1000 electrons > full well
    1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Reading:
    """A camera frame read back in intensity units, with the count of saturated pixels."""

    intensity: Tensor
    saturated: int
    pixels: int


@dataclass
class Camera:
    """Camera settings (see the module doc). ``bit_depth=0`` is an error; ``None`` disables quantisation."""

    enabled: bool = True
    bit_depth: int | None = 8
    full_well: float = 10_000.0
    exposure: float = 0.125
    shot_noise: bool = True
    read_noise: float = 5.0

    def __post_init__(self) -> None:
        bits = self.bit_depth
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32):
            raise ValueError(
                f"bit_depth must be an integer from 1 to 32 (or None for an unquantised camera), got {bits!r}."
            )
        if not self.full_well > 0 or not 0 < self.exposure <= 1:
            raise ValueError(f"Need full_well > 0 and 0 < exposure <= 1, got {self.full_well}, {self.exposure}.")
        if self.read_noise < 0:
            raise ValueError(f"read_noise must be non-negative electrons, got {self.read_noise}.")

    @property
    def noisy(self) -> bool:
        return self.enabled and (self.shot_noise or self.read_noise > 0)

    def read(self, intensity: Tensor, gain: float, generator: torch.Generator | None = None) -> Reading:
        """Expose, add noise, saturate and quantise ``intensity``; return it in intensity units."""
        return self.read_(intensity.clone(), gain, generator)

    def read_(self, intensity: Tensor, gain: float, generator: torch.Generator | None = None) -> Reading:
        """:meth:`read`, overwriting ``intensity`` (saves memory and time on large frames)."""
        if not self.enabled:
            return Reading(intensity, 0, intensity.numel())
        electrons = intensity.mul_(gain)
        if self.noisy:
            noise = torch.randn(electrons.shape, generator=generator, device=electrons.device, dtype=electrons.dtype)
            if self.shot_noise:
                noise.mul_(electrons.clamp_min(0).add_(self.read_noise**2).sqrt_())
            else:
                noise.mul_(self.read_noise)
            electrons.add_(noise)
            del noise
        saturated = int((electrons >= self.full_well).sum())
        electrons.clamp_(0.0, self.full_well)
        if self.bit_depth is None:
            return Reading(electrons.div_(gain), saturated, electrons.numel())
        step = self.full_well / ((1 << self.bit_depth) - 1)
        return Reading(electrons.div_(step).round_().mul_(step / gain), saturated, electrons.numel())
