"""The optical processing unit (OPU) emulator: binary frames, a complex random medium, a camera, retrieval.

Stages, each switchable:

1. **Encoding** (:mod:`.encoding`): the real error becomes binary DMD frames: one dithered bit plane per
   sign by default (2 frames; unbiased: the expected projection is the exact one), more bit planes, or
   ternary; ``encoding=None`` feeds the real error (non-physical, for audits). The encoding error
   ``|e - decode(frames)| / |e|`` is reported in :attr:`OPU.stats`. With ``sample_rows=f < 1`` only a
   random ``f`` of the error vectors (rows) of a call is sent to the device, the others get no feedback and
   the sent ones are scaled by ``N / sent``: the expected feedback is unchanged, the optical time is ``f`` x.
2. **Medium**: a complex Gaussian transmission matrix ``R = A + iB`` (``A``, ``B`` i.i.d.
   ``N(0, 1/d_e)``) over the ``d_e`` input pixels and ``anchor_pixels`` extra anchor pixels, computed
   by the counter-based generator like :class:`SeededGaussian`: never stored, regenerated tile by tile.
   The field ``R x`` of the frames: frames that light few pixels of the whole input (a pass of sparse errors)
   generate and multiply only the medium's rows at those pixels; otherwise the passes of a group (frames and
   fields up to :data:`GROUP_MEMORY` x the Gaussian matrix's memory, and :data:`MAX_GROUP_BYTES`) share each
   generated tile of the medium, and frames that light at most two pixels (the negative part of a softmax minus
   one-hot) add its rows instead of a matmul, bit for bit the same sum. The outputs do not depend on the grouping.
3. **Detection**: intensities ``|R x|^2`` and ``|R (x + r)|^2`` for every frame ``x``.
4. **Camera** (:mod:`.camera`): auto exposure (once), shot and read noise, saturation
   (counted in ``stats["saturated"]``, warned above 1 %), ``bit_depth``-bit quantisation with subtractive dither.
   With ``frame_power`` (default) the source's power follows each frame's lit pixel count (known before the DMD
   shows it), so that a one-pixel frame (the one-hot of a softmax error) is read as bright as a dense one instead
   of drowning in shot noise and rounding; each reading is divided by its power, so the map is unchanged.
5. **Retrieval** (anchor scheme, Ohana et al. 2023): ``(|R(x+r)|^2 - |Rx|^2 - |Rr|^2) / (2 |Rr|)
   = Re[(Rx) conj(Rr)] / |Rr| = x @ W`` with ``W = Re[R e^{-i angle(Rr)}]``, i.i.d. ``N(0, 1/d_e)``:
   the library's scale convention. ``|Rr|^2`` is measured once (the mean of ``anchor_frames`` frames: its error
   would be the same in every retrieval of every step), and the mean
   retrieval of ``blank_frames`` blank frames is subtracted from every output: the anchor's reading error is
   the same offset for every vector and would add up over a step's vectors. Output pixels where the measured
   anchor reads 0 cannot be retrieved; they give 0 and are counted
   (``stats["dark_pixels"]``).

With ``camera=False`` (or no noise and ``bit_depth=None``) the map is exactly ``decode(frames) @ W``
(:meth:`OPU.ideal_matrix` returns ``W``); with ``encoding=None`` too it is the linear projection ``e @ W``.

Device limits (:mod:`.cost`): ``max_input`` DMD pixels (including the anchor), ``max_output`` camera
pixels, ``frame_time`` and ``power_w``. Larger sizes raise an error, unless ``allow_tiling=True``:
the projection is then split over ``tiles = (input passes, output passes)`` devices' worth of frames
(each input pass its own camera exposures, partial results summed), with a warning.

Example::

    >>> opu = OPU(10, 300, seed=0)                 # dithered bit plane per sign, 8-bit noisy camera
    >>> y = opu(torch.randn(32, 10))
    >>> opu.stats["frames"], opu.stats["vectors"]  # 32 vectors x 2 frames x (x, x + r)
    (128, 32)
    >>> ideal = OPU(10, 300, seed=0, camera=False, encoding=None)
    >>> torch.allclose(ideal.materialize(), ideal.ideal_matrix(), atol=1e-5)
    True
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_dfa._checks import check_int
from lightning_dfa.projectors.base import Projector, check_saved_state
from lightning_dfa.projectors.camera import Camera
from lightning_dfa.projectors.checks import check_error
from lightning_dfa.projectors.cost import FRAME_TIME, MAX_INPUT, MAX_OUTPUT, OPU_POWER_W, device_tiles, optical_cost
from lightning_dfa.projectors.encoding import (
    DEFAULT_BITS,
    DEFAULT_ENCODING,
    binary_frames,
    check_encoding,
    encode,
    encoding_error,
)
from lightning_dfa.projectors.seeded import round_tile
from lightning_dfa.projectors.tiles import DEFAULT_GENERATOR, GENERATORS, gaussian_region, gaussian_rows, mix_seed

_REAL, _IMAG, _NOISE, _ANCHOR_NOISE, _SAMPLE, _DITHER, _BLANK = 1, 2, 3, 4, 5, 6, 7  # random streams
SATURATION_WARNING = 0.01
#: When at most this fraction of the input pixels is lit in any frame of a call (sparse errors such as a softmax
#: minus one-hot, ternarised), only the medium's rows at those pixels are generated and multiplied.
SPARSE_PIXELS = 0.25
#: Lit-pixel fraction of the frames below which the CPU adds the medium's rows instead of multiplying.
SPARSE_FRAMES = 1 / 16
#: anchor_pixels="auto": this many anchor pixels per lit pixel of the first call's frames, and at least the minimum.
AUTO_ANCHOR_PER_LIT, AUTO_ANCHOR_MIN = 2.0, 4
#: The laser's range: a frame's power (frame_power) is at most this factor above or below the calibrated one.
MAX_FRAME_POWER = 1e4
#: Error vectors encoded and sent through the emulated optics at a time (bounds the frames' working memory).
VECTORS_PER_PASS = 256
#: The passes of a group hold their frames and fields at once, at most this many times the memory of the dense
#: Gaussian's matrix (``in x out`` float32): the dense path generates each tile of the medium once per group.
GROUP_MEMORY = 2.0
#: ... and never more than this many bytes (wide outputs: one pass's fields alone can be hundreds of MB).
MAX_GROUP_BYTES = 64 << 20
#: Frames multiplied by the medium at a time (bounds their float copy for the matmul).
FRAME_CHUNK = 256
#: Frames lighting at most this many pixels add the medium's rows at those pixels (the matmul's sum, bit for bit).
FEW_PIXELS = 2


class OPU(Projector):
    """Emulated optical random projection ``(N, in_features) -> (N, out_features)``; see the module doc.

    Settings: ``encoding`` (``"ternary"``, ``"bitplanes"``, None), ``threshold`` and ``threshold_of``
    (ternary), ``bits`` (bit planes per sign) and ``dither`` (stochastic rounding); ``sample_rows`` (share of the
    error vectors sent); ``camera`` (False: ideal detector), ``bit_depth`` (8; None: no quantisation; 0 is an
    error), ``full_well`` electrons, ``exposure`` (mean signal / full well), ``shot_noise``, ``read_noise``
    (electrons rms), ``black_level`` (pedestal, fraction of full scale) and ``adc_dither`` (subtractive dither of
    the ADC); ``frame_power`` (the source's power per frame); ``blank_frames`` (the offset's calibration) and
    ``anchor_frames`` (the anchor reading's); ``anchor_pixels`` (``"auto"``: chosen at the first call,
    :meth:`calibrate`); device limits
    ``max_input``, ``max_output``, ``frame_time``, ``power_w`` and ``allow_tiling``; ``tile`` (memory of the matrix
    generation) and ``generator`` as in :class:`SeededGaussian`.

    After each call :attr:`stats` holds ``rows``, ``vectors`` (rows sent), ``frames`` (the vectors' camera frames),
    ``calibration_frames`` (one-off: the anchor reading and the blank frames, in the first call), ``encoding_error``,
    ``saturated``, ``saturated_fraction``, ``dark_pixels`` and ``nonfinite_rows``; :attr:`totals` accumulates counts.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed: int = 0,
        encoding: str | None = DEFAULT_ENCODING,
        threshold: float = 0.5,
        threshold_of: str = "row",
        bits: int = DEFAULT_BITS,
        dither: bool | None = None,
        sample_rows: float = 1.0,
        blank_frames: int = 4096,
        camera: bool = True,
        bit_depth: int | None = Camera.bit_depth,  # the camera's settings default to the Camera's own
        full_well: float = Camera.full_well,
        exposure: float = Camera.exposure,
        shot_noise: bool = Camera.shot_noise,
        read_noise: float = Camera.read_noise,
        black_level: float = Camera.black_level,
        adc_dither: bool = Camera.adc_dither,
        frame_power: bool = True,
        anchor_frames: int = 64,
        anchor_pixels: int | str = "auto",
        max_input: int = MAX_INPUT,
        max_output: int = MAX_OUTPUT,
        frame_time: float = FRAME_TIME,
        power_w: float = OPU_POWER_W,
        allow_tiling: bool = False,
        tile: int = 512,
        generator: str = DEFAULT_GENERATOR,
    ) -> None:
        super().__init__(in_features, out_features, seed=seed)
        check_encoding(encoding, bits, threshold, threshold_of)
        if not 0 < sample_rows <= 1:
            raise ValueError(f"sample_rows (share of the error vectors sent) must be in (0, 1], got {sample_rows!r}.")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
        self.encoding, self.threshold, self.threshold_of, self.bits = encoding, threshold, threshold_of, bits
        self.sample_rows, self.blank_frames = float(sample_rows), int(blank_frames)
        self.dither = encoding == "bitplanes" if dither is None else bool(dither)  # None: bit planes dither
        self._offset: Tensor | None = None  # the blank frames' mean retrieval, measured at first use
        if self.dither and encoding != "bitplanes":
            raise ValueError(f"dither=True applies to encoding='bitplanes' (stochastic rounding), got {encoding!r}.")
        self.camera = Camera(camera, bit_depth, full_well, exposure, shot_noise, read_noise, black_level, adc_dither)
        self.frame_power = bool(frame_power)
        self.anchor_frames = check_int("anchor_frames", anchor_frames, 1)
        self._mean_lit: float | None = None  # the first frames' mean lit pixels: what the gain was set for
        if anchor_pixels != "auto" and (isinstance(anchor_pixels, (bool, str)) or not int(anchor_pixels) >= 1):
            raise ValueError(f"anchor_pixels must be 'auto' or an integer of at least 1, got {anchor_pixels!r}.")
        self.anchor_setting = anchor_pixels
        #: Anchor pixels: the setting, or for "auto" None until the first call chooses them (:meth:`calibrate`).
        self.anchor_pixels: int | None = None if anchor_pixels == "auto" else int(anchor_pixels)
        #: The most anchor pixels this OPU may use: what the device limits are checked with.
        self.anchor_bound = self.anchor_pixels or max(AUTO_ANCHOR_MIN, in_features // 4)
        if encoding is None:  # analog input is not binary frames: the largest anchor, known now
            self.anchor_pixels = self.anchor_bound
        self.max_input, self.max_output, self.frame_time, self.power_w = max_input, max_output, frame_time, power_w
        self.allow_tiling = allow_tiling
        self.tiles = self._check_limits()
        self.tile, self.generator = round_tile(tile), generator
        self.std = 1.0 / math.sqrt(in_features)
        self.calls = 0
        self.stats: dict[str, Any] = {}
        self.totals = {"frames": 0, "vectors": 0, "saturated": 0, "pixels": 0, "nonfinite_rows": 0}
        self._calibration_frames = 0  # one-off frames (anchor reading, blank frames) taken since the last call's stats
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self._anchor: dict[str, Tensor] | None = None  # the anchor field, computed on first use
        self._anchor_reading: dict[str, Any] | None = None  # its intensity as the camera read it
        self.gain: float | None = None  # electrons per intensity unit, set by the auto exposure

    # -- settings, limits, state -------------------------------------------------------------------
    def settings(self) -> dict:
        cam = self.camera
        return {
            **super().settings(),
            "encoding": self.encoding,
            "threshold": self.threshold,
            "threshold_of": self.threshold_of,
            "bits": self.bits,
            "sample_rows": self.sample_rows,
            "dither": self.dither,
            "camera": cam.enabled,
            "bit_depth": cam.bit_depth,
            "full_well": cam.full_well,
            "exposure": cam.exposure,
            "shot_noise": cam.shot_noise,
            "read_noise": cam.read_noise,
            "black_level": cam.black_level,
            "adc_dither": cam.adc_dither,
            "frame_power": self.frame_power,
            "anchor_frames": self.anchor_frames,
            "anchor_pixels": self.anchor_setting,
            "blank_frames": self.blank_frames,
            "max_input": self.max_input,
            "max_output": self.max_output,
            "generator": self.generator,
        }

    def get_extra_state(self) -> dict[str, Any]:
        # The call counter seeds the camera noise, so a resumed run continues the same noise sequence.
        # The gain, set by the auto exposure on the first call, is part of the camera's state too.
        # So is the anchor size chosen then (anchor_pixels="auto").
        # And the first frames' mean lit pixels, which the frames' source powers are set from (frame_power).
        chosen = {"calls": self.calls, "gain": self.gain, "chosen_anchor_pixels": self.anchor_pixels}
        chosen["mean_lit"] = self._mean_lit
        return {**super().get_extra_state(), **chosen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        calls, gain = int(state.pop("calls", 0)), state.pop("gain", None)
        anchor, mean_lit = state.pop("chosen_anchor_pixels", None), state.pop("mean_lit", None)
        check_saved_state(state, super().get_extra_state())
        self.calls, self.gain, self.anchor_pixels, self._mean_lit = calls, gain, anchor, mean_lit
        self._anchor = self._anchor_reading = self._offset = None

    def _check_limits(self) -> tuple[int, int]:
        tiles = device_tiles(self.in_features, self.out_features, self.anchor_bound, self.max_input, self.max_output)
        if tiles != (1, 1) and not self.allow_tiling:
            raise ValueError(
                f"OPU: a {self.in_features}-pixel input (+ up to {self.anchor_bound} anchor pixels) and a "
                f"{self.out_features}-pixel output exceed the device ({self.max_input} input, {self.max_output} "
                f"output pixels). Pass allow_tiling=True to split it over {tiles[0]} x {tiles[1]} device passes "
                "(frames multiply accordingly), or raise max_input / max_output."
            )
        if tiles != (1, 1):
            warnings.warn(
                f"OPU: {self.in_features} -> {self.out_features} exceeds one device; tiled over {tiles[0]} input x "
                f"{tiles[1]} output passes (see OPU.tiles); every vector costs {tiles[0] * tiles[1]}x the frames.",
                UserWarning,
                stacklevel=3,
            )
        return tiles

    def frames_per_vector(self) -> int:
        """Camera frames per error vector, all device passes included."""
        cost = optical_cost(
            1,
            self.in_features,
            self.out_features,
            encoding=self.encoding,
            bits=self.bits,
            anchor_pixels=self.anchor_bound,
            max_input=self.max_input,
            max_output=self.max_output,
        )
        return cost.frames

    # -- the medium ----------------------------------------------------------------------------------
    def medium_tile(
        self, rows: tuple[int, int], cols: tuple[int, int], device: torch.device, scale: float = 1.0
    ) -> Tensor:
        """Rows ``[r0, r1)`` (pixels), columns ``[c0, c1)`` of ``scale [A | B]``: shape ``(r1 - r0, 2 (c1 - c0))``."""
        width = cols[1] - cols[0]
        out = torch.empty(rows[1] - rows[0], 2 * width, device=device)
        for i, stream in enumerate((_REAL, _IMAG)):
            part = gaussian_region(
                self.seed, stream, rows, cols, self.std * scale, device=device, generator=self.generator
            )
            out[:, i * width : (i + 1) * width] = part
        return out

    def medium_rows(self, pixels: Tensor, cols: tuple[int, int], scale: float = 1.0) -> Tensor:
        """The rows of :meth:`medium_tile` at the input pixels ``pixels`` (int64, on the device wanted), bit for bit."""
        width = cols[1] - cols[0]
        out = torch.empty(pixels.numel(), 2 * width, device=pixels.device)
        for i, stream in enumerate((_REAL, _IMAG)):
            part = gaussian_rows(self.seed, stream, pixels, cols, self.std * scale)
            out[:, i * width : (i + 1) * width] = part
        return out

    def anchor(self, device: torch.device) -> dict[str, Tensor]:
        """The anchor field ``R r`` (``"real"``, ``"imag"``, float32 on ``device``); computed once, on first use."""
        if self.anchor_pixels is None:
            raise RuntimeError(
                "OPU(anchor_pixels='auto') chooses its anchor from the first call's frames: call it once before "
                "ideal_matrix(), or pass anchor_pixels=N."
            )
        if self._anchor is None:
            self._anchor = self._anchor_field()
        if self._anchor["real"].device != device:
            self._anchor = {k: v.to(device) for k, v in self._anchor.items()}
        return self._anchor

    def _anchor_field(self) -> dict[str, Tensor]:
        rows = (self.in_features, self.in_features + self.anchor_pixels)
        real, imag = torch.zeros(self.out_features), torch.zeros(self.out_features)
        for c0 in range(0, self.out_features, self.tile):
            c1 = min(c0 + self.tile, self.out_features)
            for r0 in range(rows[0], rows[1], self.tile):
                r1 = min(r0 + self.tile, rows[1])
                block = self.medium_tile((r0, r1), (c0, c1), torch.device("cpu")).double().sum(0)
                real[c0:c1] += block[: c1 - c0].float()
                imag[c0:c1] += block[c1 - c0 :].float()
        return {"real": real, "imag": imag}

    def calibrate(self, frames: Tensor, weights: Tensor | None = None) -> float:
        """The anchor size (``anchor_pixels="auto"``) and the auto exposure, once, from the first frames.

        The retrieved signal is the cross term ``2 Re[(Rx) conj(Rr)]`` of ``|R(x + r)|^2``: at a given brightness it
        takes the largest share of the camera's counts when the anchor is as bright as the frame. Frames differ (a
        softmax error gives a dense positive frame and a one-pixel negative one), so with ``frame_power`` "auto"
        takes the anchor that minimises the frames' retrieval noise weighted by their squared weights,
        ``sqrt(sum w^2 L^2 / sum w^2)`` over the frames' lit pixel counts ``L``; without it,
        :data:`AUTO_ANCHOR_PER_LIT` x the mean lit pixels per frame. Always at least :data:`AUTO_ANCHOR_MIN` and at
        most ``anchor_bound``.

        The gain puts the expected mean ``|R(x + r)|^2`` of ``frames`` at ``exposure``: over the random medium
        ``E |R(x + r)|_j^2 = 2 (|x|_0 + anchor_pixels) / d_e`` for a binary frame ``x``, so it depends on the first
        frames' pixel counts only (not on the tile size or the device).
        """
        if self.gain is None:
            lit = float(frames.sum()) / max(1, frames.shape[0] * frames.shape[1]) if frames.numel() else 0.0
            if self.anchor_pixels is None:
                # (analog frames of encoding=None are not binary: they take the largest anchor)
                chosen = self._auto_anchor(frames, weights, lit) if self.encoding else self.anchor_bound
                self.anchor_pixels, self._anchor = min(self.anchor_bound, chosen), None
            self._mean_lit = lit
            mean_intensity = 2.0 * (lit + self.anchor_pixels) / self.in_features
            self.gain = self.camera.exposure * self.camera.full_well / mean_intensity
            self._anchor_reading = self._offset = None
        return self.gain

    def _auto_anchor(self, frames: Tensor, weights: Tensor | None, lit: float) -> int:
        """The anchor size of ``anchor_pixels="auto"`` (see :meth:`calibrate`)."""
        if not self.frame_power or weights is None or frames.numel() == 0:
            return max(AUTO_ANCHOR_MIN, round(AUTO_ANCHOR_PER_LIT * lit))
        # With every frame at the same brightness (frame_power), a frame of L lit pixels retrieves its L-pixel signal
        # with a noise variance ~ (a + L)^2 / a for an anchor of a pixels; weighted by the frame's squared weight
        # w^2 (what its error costs the feedback), the sum is least at a = sqrt(sum w^2 L^2 / sum w^2).
        counts = frames.sum(-1).double()
        square = weights.squeeze(-1).double().square()
        total = float(square.sum())
        best = (float((square * counts.square()).sum()) / total) ** 0.5 if total else 0.0
        return max(AUTO_ANCHOR_MIN, round(best))

    def frame_powers(self, flat: Tensor, anchored: bool) -> Tensor | None:
        """Per frame row, the laser power (relative to the calibrated one) that brings its expected intensity to the
        calibrated mean, alone (``anchored=False``) or with the anchor; None without ``frame_power``.

        The DMD's frames are known before they are shown, so the source's power can follow each one's lit pixel
        count: a frame of one lit pixel gets as many photons as a dense one, instead of drowning in shot noise and
        the ADC's rounding. Retrieval divides each reading by its power, so the map is unchanged.
        """
        return self._powers(_lit_counts(flat), anchored) if self._powered() else None

    def _powered(self) -> bool:
        """Whether readings are taken at per-frame powers: ``frame_power``, a camera, and the exposure calibrated."""
        return self.frame_power and self.camera.enabled and self._mean_lit is not None

    def _powers(self, lit: Tensor, anchored: bool) -> Tensor:
        """The powers of frames of ``lit`` pixels (float64 counts), read alone or with the anchor."""
        lit = lit + (self.anchor_pixels if anchored else 0)
        target = self._mean_lit + self.anchor_pixels
        return (target / lit.clamp_min(1.0)).clamp_(1.0 / MAX_FRAME_POWER, MAX_FRAME_POWER)

    def anchor_reading(self, device: torch.device) -> dict[str, Any]:
        """``|R r|^2`` as the camera reads it: the mean of ``anchor_frames`` frames (per device pass), after
        :meth:`calibrate`; with ``frame_power`` at the power that brings the anchor alone to the exposure.

        Every retrieval divides by ``sqrt`` of this reading and subtracts it: its error is the same for every frame
        and every step, so it is averaged once rather than left to add up over training.
        """
        if self._anchor_reading is None:
            field = self.anchor(torch.device("cpu"))
            intensity = field["real"].double() ** 2 + field["imag"].double() ** 2
            generator = self._stream(_ANCHOR_NOISE, torch.device("cpu"))
            # the anchor alone is a blank frame read with the anchor
            power = float(self._powers(torch.zeros(1, dtype=torch.float64), True)) if self._powered() else 1.0
            frames = intensity.expand(self.anchor_frames, -1).contiguous()
            reading = self.camera.read(frames, self.gain * power, generator)
            self._calibration_frames += self.anchor_frames * self.tiles[0] * self.tiles[1]
            mean = reading.intensity.mean(0).float()
            self._anchor_reading = {"intensity": mean, "saturated": reading.saturated}
        if self._anchor_reading["intensity"].device != device:
            self._anchor_reading["intensity"] = self._anchor_reading["intensity"].to(device)
        return self._anchor_reading

    @torch.no_grad()
    def ideal_matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W = Re[R e^{-i angle(Rr)}]`` over the input pixels: the map of the ideal emulator (small sizes)."""
        device = self._device_anchor.device
        anchor = self.anchor(device)
        medium = self.medium_tile((0, self.in_features), (0, self.out_features), device)
        real, imag = medium[:, : self.out_features], medium[:, self.out_features :]
        modulus = torch.sqrt(anchor["real"] ** 2 + anchor["imag"] ** 2)
        return ((real * anchor["real"] + imag * anchor["imag"]) / modulus).to(dtype)

    # -- the projection ------------------------------------------------------------------------------
    def forward(self, error: Tensor) -> Tensor:
        bad_rows = check_error(type(self).__name__, error, self.in_features)
        work = torch.float64 if error.dtype == torch.float64 else torch.float32
        clean = error.to(work) if bad_rows is None else error.to(work).masked_fill(bad_rows[:, None], 0.0)
        sent = self._sampled_rows(clean.shape[0], clean.device)
        if sent is None:
            out = self._project(clean)
        else:  # unbiased: each row is sent with probability len(sent) / N and then scaled by its inverse
            out = torch.zeros(clean.shape[0], self.out_features, dtype=work, device=clean.device)
            out[sent] = self._project(clean[sent]).mul_(clean.shape[0] / sent.numel())
        self._record(error, bad_rows)
        if bad_rows is not None:
            out[bad_rows] = float("nan")
        return out.to(error.dtype)

    def _stream(self, stream: int, device: torch.device, *index: int) -> torch.Generator:
        """The generator of one random stream of this OPU (camera noise, dither, sampling...), at ``index``."""
        return torch.Generator(device=device).manual_seed(mix_seed(self.seed, stream, *index))

    def _sampled_rows(self, rows: int, device: torch.device) -> Tensor | None:
        """The rows sent to the device in this call (sorted), or None for all of them (``sample_rows=1``)."""
        if self.sample_rows >= 1 or rows == 0:
            return None
        generator = self._stream(_SAMPLE, device, self.calls)
        count = max(1, round(self.sample_rows * rows))
        return torch.randperm(rows, generator=generator, device=device)[:count].sort().values

    def _project(self, clean: Tensor) -> Tensor:
        """The optical projection of the finite rows ``clean``: encoding, medium, camera, retrieval.

        ``VECTORS_PER_PASS`` vectors at a time, so that their frames, fields and camera buffers stay small; the
        passes of a group (:meth:`_passes_per_group`) are encoded first, so that the dense path generates each tile
        of the medium once for all of them (:meth:`_project_group`).
        """
        generator = self._stream(_NOISE, clean.device, self.calls)
        dither = self._stream(_DITHER, clean.device, self.calls) if self.dither else None
        out = torch.zeros(clean.shape[0], self.out_features, dtype=clean.dtype, device=clean.device)
        saturated, read, residual = 0, 0, 0.0
        anchor = None
        total, group = max(clean.shape[0], 1), VECTORS_PER_PASS * self._passes_per_group(clean.dtype)
        for g0 in range(0, total, group):  # no rows: one empty pass, for the stats
            passes = []
            for v0 in range(g0, min(g0 + group, total), VECTORS_PER_PASS):
                errors = clean[v0 : v0 + VECTORS_PER_PASS]
                frames = encode(
                    errors,
                    self.encoding,
                    threshold=self.threshold,
                    threshold_of=self.threshold_of,
                    bits=self.bits,
                    dither=dither,
                )
                if anchor is None:  # the first frames of the first call set the anchor's size and the exposure
                    self.calibrate(frames.frames, frames.weights)
                    anchor = self._anchor_counts(clean.device, clean.dtype)
                    anchor["offset"] = self._blank_offset(anchor, out)
                residual += encoding_error(errors, frames, relative=False) ** 2
                passes.append(
                    [frames.frames.reshape(-1, self.in_features), frames.weights, out[v0 : v0 + VECTORS_PER_PASS]]
                )
            frames = None  # the group owns the frames now (and frees them early)
            sat, pixels = self._project_group(passes, generator, anchor)
            saturated, read = saturated + sat, read + pixels
        norm = float(clean.norm())
        self.stats = {
            "vectors": clean.shape[0],
            "encoding_error": residual**0.5 / norm if norm else 0.0,
            "saturated": saturated,
            "saturated_fraction": saturated / max(read, 1),
            "pixels": read,
            "anchor_saturated": anchor["saturated"],
            "dark_pixels": int((anchor["intensity"] <= 0).sum()),
        }
        return out

    def _blocks(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The ``(output columns, input pixels)`` blocks of a pass, in the camera's order: output tiles of ``tile``
        columns, and within each the device's input chunks (each its own exposure)."""
        chunk = self.max_input - self.anchor_bound  # input pixels per device pass
        return [
            ((c0, min(c0 + self.tile, self.out_features)), (i0, min(i0 + chunk, self.in_features)))
            for c0 in range(0, self.out_features, self.tile)
            for i0 in range(0, self.in_features, chunk)
        ]

    def _passes_per_group(self, work: torch.dtype) -> int:
        """Passes whose frames and fields (every block's) are held at once: as many as fit in :data:`GROUP_MEMORY`
        times the dense Gaussian's own matrix (``in x out`` float32) and in :data:`MAX_GROUP_BYTES`, at least one."""
        count = binary_frames(self.encoding, self.bits)
        frames = count * VECTORS_PER_PASS * self.in_features * (1 if self.encoding else work.itemsize)
        fields = count * VECTORS_PER_PASS * sum(2 * (c1 - c0) for (c0, c1), _ in self._blocks())
        budget = min(GROUP_MEMORY * 4 * self.in_features * self.out_features, MAX_GROUP_BYTES)
        return max(1, int(budget // (frames + fields * work.itemsize)))

    def _project_group(self, passes: list[list], generator: torch.Generator, anchor: dict) -> tuple[int, int]:
        """Add the retrieved projection of each pass, less the blank offset, to its ``out``; return the saturated
        and read pixel counts. ``passes``: ``[frames (F N, in), weights (F, N, 1), out]`` each; the frames are
        released once their fields are computed.

        A single pass streams: each block's field, in one reused buffer, goes through the camera before the next.
        Several passes get every block's field computed first, each tile of the medium generated once for all of
        them, and then go through the camera pass by pass: the camera's noise is drawn in the same order either way.
        """
        blocks, like = self._blocks(), passes[0][2]
        lits = [self._lit_pixels(flat) for flat, _, _ in passes]
        # each device pass (input chunk) shows its own pixels of the frames: its powers follow them
        chunks = {pixels for _, pixels in blocks}
        powers = [{c: self._pass_powers(flat[:, c[0] : c[1]], like.dtype) for c in chunks} for flat, _, _ in passes]
        rows, width = max(flat.shape[0] for flat, _, _ in passes), min(self.tile, self.out_features)
        stream = len(passes) == 1
        if stream:
            buffer = torch.empty(rows * 2 * width, dtype=like.dtype, device=like.device)
            fields = [[buffer[: rows * 2 * (c1 - c0)].view(rows, 2 * (c1 - c0)) for (c0, c1), _ in blocks]]
        else:
            flats = [flat for flat, _, _ in passes]
            fields = [
                [flat.new_empty(flat.shape[0], 2 * (c1 - c0), dtype=like.dtype) for (c0, c1), _ in blocks]
                for flat in flats
            ]
            for b, block in enumerate(blocks):
                self._block_fields(flats, lits, block, [pass_fields[b] for pass_fields in fields], anchor["scale"])
            del flats
            for entry in passes:  # the frames are no longer needed: free them before the camera's buffers exist
                entry[0] = None
        # Camera buffers shared by the passes: the intensities of the frames alone, and the camera's noise and
        # noise scale (only when it has noise).
        scratch = [
            torch.empty(rows * width, dtype=like.dtype, device=like.device)
            for _ in range(1 + self.camera.noisy + (self.camera.noisy and self.camera.shot_noise))
        ]
        saturated = read = 0
        for (flat, weights, out), lit, power, pass_fields in zip(passes, lits, powers, fields):
            for block, field in zip(blocks, pass_fields):
                if stream:
                    self._block_fields([flat], [lit], block, [field], anchor["scale"])
                sat = self._detect(weights, power[block[1]], field, block[0], out, generator, anchor, scratch)
                saturated, read = saturated + sat, read + 2 * field.shape[0] * (block[0][1] - block[0][0])
        return saturated, read

    def _pass_powers(self, flat: Tensor, work: torch.dtype) -> list[Tensor] | None:
        """The source powers of the frames ``flat`` for their two readings, alone and with the anchor (``(F N, 1)``
        each, :meth:`frame_powers`), or None."""
        if not self._powered():
            return None
        lit = _lit_counts(flat)  # counted once for both readings
        return [self._powers(lit, anchored).to(work)[:, None] for anchored in (False, True)]

    def _detect(
        self, weights: Tensor, powers, field: Tensor, cols: tuple[int, int], out: Tensor, generator, anchor, scratch
    ):
        """One block's field through the camera (``powers``: :meth:`_pass_powers`) and the retrieval, less the blank
        offset, weighted by the frames' ``weights`` into ``out``; returns the saturated pixel count."""
        count, vectors = weights.shape[:2]
        width, rows = cols[1] - cols[0], field.shape[0]
        views = [b[: rows * width].view(rows, width) for b in scratch]
        y, sat = self._retrieve(field, anchor, cols, generator, views, powers)
        y -= anchor["offset"][cols[0] : cols[1]]
        for weight, part in zip(weights, y.view(count, vectors, width)):
            out[:, cols[0] : cols[1]].addcmul_(weight, part)
        return sat

    def _blank_offset(self, anchor: dict, like: Tensor) -> Tensor:
        """The mean retrieval of ``blank_frames`` blank frames, measured once: the offset that the anchor's reading
        error makes on each output pixel for every frame, which would add up over a step's vectors (module doc)."""
        if self._offset is None:
            self._offset = torch.zeros(self.out_features, dtype=like.dtype, device=like.device)
            if self.camera.enabled and self.blank_frames:
                generator = self._stream(_BLANK, like.device)
                blank = torch.zeros(1, self.in_features, dtype=torch.bool, device=like.device)
                powers = self._pass_powers(blank, like.dtype)
                for c0 in range(0, self.out_features, self.tile):
                    c1 = min(c0 + self.tile, self.out_features)
                    field = torch.zeros(self.blank_frames, 2 * (c1 - c0), dtype=like.dtype, device=like.device)
                    alone = torch.empty(self.blank_frames, c1 - c0, dtype=like.dtype, device=like.device)
                    y, _ = self._retrieve(field, anchor, (c0, c1), generator, [alone], powers)
                    self._offset[c0:c1] = y.mean(0)
                self._calibration_frames += 2 * self.blank_frames * self.tiles[0] * self.tiles[1]
        return self._offset.to(like)

    def _anchor_counts(self, device: torch.device, work: torch.dtype) -> dict[str, Any]:
        """The anchor field and reading in camera counts, and what the retrieval needs, for this call.

        The medium is generated scaled by ``sqrt(k)``, ``k = gain / camera.unit`` counts per intensity unit (1
        without a camera), so that intensities come out of the matmul in counts, ready for the camera.
        Retrieval: ``(I(x + r) - I(x) - I(r)) / (2 sqrt(k) sqrt(I(r)))`` in counts equals the intensity-unit formula.
        """
        field, reading = self.anchor(device), self.anchor_reading(device)
        k = self.gain / self.camera.unit if self.camera.enabled else 1.0
        intensity = reading["intensity"].to(work)
        lit = intensity > 0
        denominator = torch.where(lit, 2.0 * k * intensity.sqrt(), torch.ones_like(intensity))
        return {
            **reading,  # "intensity" and "saturated", as the camera read the anchor
            "scale": math.sqrt(k),
            "real": field["real"].to(work) * math.sqrt(k),
            "imag": field["imag"].to(work) * math.sqrt(k),
            "counts": intensity * k,
            "inverse": lit / denominator,  # 0 on dark pixels: they cannot be retrieved
        }

    def _lit_pixels(self, flat: Tensor) -> Tensor | None:
        """The input pixels lit in some frame of this call, if they are few (:data:`SPARSE_PIXELS`), else None.

        Only the counter generator can give arbitrary rows of the medium, and only binary frames are sparse; frames
        that light most pixels go the dense way (one matmul per tile of the medium).
        """
        if self.generator != "counter" or self.encoding is None or flat.shape[0] == 0:
            return None
        lit = flat.view(torch.uint8).amax(0).nonzero().flatten()  # (5 x the speed of flat.any(0))
        return lit if lit.numel() <= SPARSE_PIXELS * self.in_features else None

    def _block_fields(self, flats: list[Tensor], lits: list, block: tuple, outs: list[Tensor], scale: float) -> None:
        """``[Re, Im]`` of ``sqrt(k) R x`` for the frames ``flats`` of some passes, over one block's input pixels
        and output columns, into ``outs``.

        A pass with ``lit`` (the pixels lit in some of its frames) generates and multiplies only those rows of the
        medium (the dark pixels add nothing to the field); the other passes share each generated tile of the medium.
        """
        cols, rows = block
        dense = []
        for flat, lit, out in zip(flats, lits, outs):
            if lit is None:
                dense.append((flat, out))
            else:
                self._sparse_field(flat, lit[(lit >= rows[0]) & (lit < rows[1])], cols, scale, out)
        if not dense:
            return
        # Chunks of frames that light at most FEW_PIXELS pixels each add the medium's rows at those pixels instead of
        # a matmul (binary frames only): the same sum, bit for bit (one or two non-zero terms and exact zeros).
        few = [self._few_pixel_chunks(flat[:, rows[0] : rows[1]]) for flat, _ in dense]
        for _, out in dense:
            out.zero_()
        for r0 in range(rows[0], rows[1], self.tile):
            r1 = min(r0 + self.tile, rows[1])
            medium = self.medium_tile((r0, r1), cols, dense[0][0].device, scale).to(dense[0][1].dtype)
            for (flat, out), chunks in zip(dense, few):
                add_frames_times(out, flat[:, r0:r1], medium, chunks, r0 - rows[0])

    def _few_pixel_chunks(self, frames: Tensor) -> list | None:
        """For each chunk of :data:`FRAME_CHUNK` binary ``frames``: the ``(frame, pixel)`` indices of its lit pixels if
        no frame lights more than :data:`FEW_PIXELS` of them, else None (a matmul); None for analog frames."""
        if self.encoding is None:
            return None
        lit = frames.view(torch.uint8).sum(1, dtype=torch.int32)  # lit pixels per frame (10 x count_nonzero's speed)
        chunks = []
        for f0 in range(0, frames.shape[0], FRAME_CHUNK):
            few = int(lit[f0 : f0 + FRAME_CHUNK].amax()) <= FEW_PIXELS
            chunks.append(frames[f0 : f0 + FRAME_CHUNK].nonzero(as_tuple=True) if few else None)
        return chunks

    def _sparse_field(self, flat: Tensor, pixels: Tensor, cols: tuple[int, int], scale: float, out: Tensor) -> None:
        """:meth:`_field` over the lit ``pixels`` only, ``tile`` of them at a time.

        On the CPU, binary frames that are sparse even among the lit pixels (:data:`SPARSE_FRAMES`) add the medium's
        rows of their lit pixels (``index_add_``) instead of a matmul (elsewhere ``index_add_`` is not deterministic).
        """
        out.zero_()
        gather = flat.device.type == "cpu" and self.encoding is not None
        for p0 in range(0, pixels.numel(), self.tile):
            index = pixels[p0 : p0 + self.tile]
            medium = self.medium_rows(index, cols, scale).to(out.dtype)
            part = flat.index_select(1, index)
            if gather and int(torch.count_nonzero(part)) <= SPARSE_FRAMES * part.numel():
                frame, pixel = part.nonzero(as_tuple=True)
                out.index_add_(0, frame, medium.index_select(0, pixel))
            else:
                add_frames_times(out, part, medium)

    def _retrieve(
        self, field: Tensor, anchor: dict, cols: tuple[int, int], generator: torch.Generator, buffers, powers=None
    ):
        """Intensities of ``x`` and ``x + r`` through the camera, then the anchor retrieval ``x @ W``.

        Overwrites ``field`` (the retrieved projection is returned as a view of it) and uses ``buffers``: the
        intensities of the frames alone, then the camera's noise and noise scale when it has noise. ``powers``: the
        two readings' source powers per frame row (:meth:`frame_powers`), or None.
        """
        width = cols[1] - cols[0]
        real, imag = field[:, :width], field[:, width:]
        alone, noise, scale = (*buffers, None, None)[:3]
        torch.mul(real, real, out=alone).addcmul_(imag, imag)  # |R x|^2, in counts
        saturated = self._expose(alone, generator, noise, scale, None if powers is None else powers[0])
        real.add_(anchor["real"][cols[0] : cols[1]])
        imag.add_(anchor["imag"][cols[0] : cols[1]])
        lit = real.mul_(real).addcmul_(imag, imag)  # |R (x + r)|^2, in counts
        saturated += self._expose(lit, generator, noise, scale, None if powers is None else powers[1])
        y = lit.sub_(alone).sub_(anchor["counts"][cols[0] : cols[1]]).mul_(anchor["inverse"][cols[0] : cols[1]])
        return y, saturated

    def _expose(self, counts: Tensor, generator, noise, scale, power: Tensor | None) -> int:
        """The camera's reading of ``counts`` taken at the source ``power`` per row, brought back to the calibrated
        power (the retrieval's units)."""
        if power is None:
            return self.camera.expose_(counts, generator, noise, scale)
        saturated = self.camera.expose_(counts.mul_(power), generator, noise, scale)
        counts.div_(power)
        return saturated

    def _record(self, error: Tensor, bad_rows: Tensor | None) -> None:
        """Complete :attr:`stats` of this call (set by :meth:`_project`) and add them to :attr:`totals`."""
        self.calls += 1
        stats = self.stats
        stats.update(
            rows=error.shape[0],
            frames=stats["vectors"] * self.frames_per_vector(),
            calibration_frames=self._calibration_frames,
            nonfinite_rows=0 if bad_rows is None else int(bad_rows.sum()),
            tiles=self.tiles,
        )
        for key in self.totals:
            self.totals[key] += stats[key]
        self.totals["frames"] += self._calibration_frames
        self._calibration_frames = 0
        if stats["saturated_fraction"] > SATURATION_WARNING:
            warnings.warn(
                f"OPU camera: {stats['saturated_fraction']:.1%} of the pixels saturated in this call "
                "(stats['saturated']); lower `exposure` or raise `full_well`.",
                RuntimeWarning,
                stacklevel=3,
            )


def _lit_counts(flat: Tensor) -> Tensor:
    """Lit pixels per frame row, float64; binary frames by a uint8 sum (exact, ten times a float64 sum's speed)."""
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8).sum(1, dtype=torch.int32).double()
    return flat.sum(1, dtype=torch.float64)


def add_frames_times(
    out: Tensor, frames: Tensor, medium: Tensor, few: list | None = None, first: int = 0, rows: int | None = None
) -> None:
    """``out += frames @ medium`` for binary (``bool``) or real frames, ``rows`` (:data:`FRAME_CHUNK`) frames at a
    time, so that the frames' float copy for the matmul stays small.

    ``few`` (from :meth:`OPU._few_pixel_chunks`, one entry per chunk): a chunk with the ``(frame, pixel)`` indices of
    its lit pixels, counted from pixel ``first`` of ``medium``'s rows, adds those rows of ``medium`` instead. With at
    most two terms per frame the sum is the matmul's, bit for bit, in any order: so ``index_add_`` is
    deterministic here on every device.
    """
    rows = FRAME_CHUNK if rows is None else rows
    for k, r0 in enumerate(range(0, frames.shape[0], rows)):
        pairs = None if few is None else few[k]
        if pairs is None:
            chunk = frames[r0 : r0 + rows]
            chunk = chunk.view(torch.uint8) if chunk.dtype == torch.bool else chunk  # (7 x the speed of bool's copy)
            out[r0 : r0 + rows].addmm_(chunk.to(medium.dtype), medium)
            continue
        frame, pixel = pairs
        inside = (pixel >= first) & (pixel < first + medium.shape[0])
        out[r0 : r0 + rows].index_add_(0, frame[inside], medium.index_select(0, pixel[inside] - first))
