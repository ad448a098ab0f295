"""The OPU's camera: exposure and gain, shot and read noise, saturation, and analog-to-digital quantisation.

Intensities ``I`` (in the emulator's units, ``|R x|^2``) become photo-electrons ``I * gain``, where the
gain is set once by an automatic exposure (``OPU.calibrate``): the expected mean intensity of the
first frames, anchor included, fills ``exposure`` of the full well. Then:

* shot noise (Poisson, emulated by its Gaussian approximation ``N(λ, λ)``, exact in mean and
  variance; good above ~10 electrons) and read noise ``N(0, read_noise^2)`` electrons;
* saturation at ``full_well`` electrons: clipped and **counted** (:attr:`Reading.saturated`);
* an ADC of ``bit_depth`` bits over ``[0, full_well]`` (``None``: no quantisation), with an optional black level
  and, by default, subtractive dither (a known random pedestal per frame row, removed after rounding, so that
  rounding errors do not depend on the signal and do not repeat from frame to frame);
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
    exposure: float = 0.1
    shot_noise: bool = True
    read_noise: float = 5.0
    #: Black level: a pedestal of this fraction of full scale added before the ADC and subtracted after, so that
    #: negative noise on dark pixels is not clipped at 0 (a sensor's black-level/offset register).
    black_level: float = 0.0
    #: Subtractive ADC dither: a known uniform pedestal of one count, drawn per frame row, added before rounding and
    #: subtracted after, so that rounding errors are independent of the signal (the black-level register set to a
    #: known random value for each frame).
    adc_dither: bool = True

    def __post_init__(self) -> None:
        bits = self.bit_depth
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 32):
            raise ValueError(
                f"bit_depth must be an integer from 1 to 32 (or None for an unquantised camera), got {bits!r}."
            )
        if not self.full_well > 0 or not 0 < self.exposure <= 1:
            raise ValueError(f"Need full_well > 0 and 0 < exposure <= 1, got {self.full_well}, {self.exposure}.")
        if not 0 <= self.black_level < 1:
            raise ValueError(f"black_level must be a fraction of full scale in [0, 1), got {self.black_level}.")
        if self.read_noise < 0:
            raise ValueError(f"read_noise must be non-negative electrons, got {self.read_noise}.")

    @property
    def noisy(self) -> bool:
        return self.enabled and (self.shot_noise or self.read_noise > 0)

    @property
    def unit(self) -> float:
        """Electrons per camera count: one ADC step (``full_well / (2^bit_depth - 1)``), or 1 without quantisation."""
        return self.full_well / ((1 << self.bit_depth) - 1) if self.bit_depth is not None else 1.0

    def read(self, intensity: Tensor, gain: float, generator: torch.Generator | None = None) -> Reading:
        """Expose, add noise, saturate and quantise ``intensity``; return it in intensity units."""
        return self.read_(intensity.clone(), gain, generator)

    def read_(self, intensity: Tensor, gain: float, generator: torch.Generator | None = None) -> Reading:
        """:meth:`read`, overwriting ``intensity`` (saves memory and time on large frames)."""
        if not self.enabled:
            return Reading(intensity, 0, intensity.numel())
        counts = intensity.mul_(gain / self.unit)
        saturated = self.expose_(counts, generator)
        return Reading(counts.mul_(self.unit / gain), saturated, counts.numel())

    def expose_(
        self,
        counts: Tensor,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> int:
        """In place: a noise-free signal in counts (:attr:`unit` electrons each) becomes the camera's reading.

        Shot and read noise are added in electrons (``N(0, max(e, 0) + read_noise^2)``, expressed in counts),
        values at or above the full well are counted (returned) and clipped, then rounded to whole counts
        when ``bit_depth`` is set. ``noise`` and ``scale`` are optional contiguous scratch tensors shaped like
        ``counts`` (allocated when not given). A disabled camera leaves ``counts`` as they are.
        """
        if not self.enabled:
            return 0
        unit = self.unit
        if self.noisy:
            noise = torch.empty_like(counts, memory_format=torch.contiguous_format) if noise is None else noise
            if self.shot_noise:
                # e + N(0, e + r^2) electrons = c + N(0, 1/unit) sqrt(c + r^2 / unit) counts.
                noise.normal_(0.0, unit**-0.5, generator=generator)
                scale = torch.empty_like(noise) if scale is None else scale
                torch.clamp_min(counts, 0.0, out=scale).add_(self.read_noise**2 / unit).sqrt_()
                counts.addcmul_(noise, scale)
            else:
                counts.add_(noise.normal_(0.0, self.read_noise / unit, generator=generator))
        full = self.full_well / unit
        pedestal = self._pedestal(counts, full, generator)
        if pedestal is not None:
            counts.add_(pedestal)
        saturated = int(torch.count_nonzero(counts >= full))
        counts.clamp_(0.0, full)
        if self.bit_depth is not None:
            counts.round_()
        if pedestal is not None:
            counts.sub_(pedestal)
        return saturated

    def _pedestal(self, counts: Tensor, full: float, generator: torch.Generator | None) -> Tensor | float | None:
        """What is added before the ADC and subtracted after: the black level, plus (``adc_dither``) a uniform
        one-count value per frame row; None when there is neither."""
        if not (self.adc_dither and self.bit_depth is not None):
            return self.black_level * full if self.black_level else None
        shape = (*counts.shape[:-1], 1) if counts.dim() > 1 else (1,)
        dither = torch.rand(shape, generator=generator, dtype=counts.dtype, device=counts.device)
        return dither.add_(self.black_level * full)
