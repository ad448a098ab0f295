"""The OPU emulator: exact ideal map, encodings to their stated precision, camera physics, limits, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_dfa.projectors import OPU, Camera
from lightning_dfa.projectors.encoding import bitplanes, encode, encoding_error, ternarize

D_E, D_FB = 64, 512


def linearity_error(opu: OPU, error: torch.Tensor) -> float:
    """Relative distance of the OPU's output from the exact linear projection of its encoded input."""
    out = opu(error)  # first: anchor_pixels="auto" is chosen at the first call
    reference = encode(error, opu.encoding, threshold=opu.threshold, bits=opu.bits).decode() @ opu.ideal_matrix()
    return float((out - reference).norm() / reference.norm())


@pytest.fixture
def errors() -> torch.Tensor:
    return torch.randn(32, D_E, generator=torch.Generator().manual_seed(0))


def test_ideal_opu_is_exactly_a_real_linear_gaussian_projection(errors):
    opu = OPU(D_E, D_FB, seed=1, camera=False, encoding=None)
    w = opu.ideal_matrix()
    assert torch.allclose(opu(errors), errors @ w, rtol=0, atol=1e-5 * float((errors @ w).abs().max()))
    assert torch.allclose(opu.materialize(), w, atol=1e-5)
    assert abs(float(w.var()) * D_E - 1) < 0.02  # the library's scale convention, N(0, 1/d_e)


def test_ideal_opu_projects_the_ternarised_error_and_reports_the_encoding_error(errors):
    opu = OPU(D_E, D_FB, seed=1, camera=False, encoding="ternary")
    frames = ternarize(errors, 0.5)
    assert torch.allclose(opu(errors), frames.decode() @ opu.ideal_matrix(), atol=1e-4)
    assert opu.stats["encoding_error"] == pytest.approx(encoding_error(errors, frames))
    assert 0.3 < opu.stats["encoding_error"] < 0.55


def test_ternarisation_is_the_least_squares_ternary_code_with_the_stated_error():
    e = torch.randn(200, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    frames = ternarize(e, threshold=0.5)
    assert set(frames.frames.unique().tolist()) <= {0.0, 1.0} and frames.frames.shape == (2, 200, 4096)
    decoded = frames.decode()
    t = 0.5 * e.pow(2).mean(1, keepdim=True).sqrt()
    assert torch.equal(decoded != 0, e.abs() > t) and torch.equal(decoded.sign(), e.sign() * (e.abs() > t))
    # For N(0,1) entries and threshold tau: relative error^2 = 1 - 2 phi(tau)^2 / (1 - Phi(tau)).
    tau = 0.5
    phi, tail = math.exp(-(tau**2) / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(tau / math.sqrt(2))
    assert encoding_error(e, frames) == pytest.approx(math.sqrt(1 - 2 * phi**2 / tail), abs=0.005)


def test_absolute_threshold_ternarises_against_the_given_value():
    e = torch.tensor([[0.2, -0.35, 0.5, -2.0]])
    frames = ternarize(e, 0.3, threshold_of="absolute").frames[:, 0]
    assert torch.equal(frames, torch.tensor([[0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool))


def test_ternary_weights_each_sign_by_the_mean_magnitude_of_its_lit_entries():
    e = torch.tensor([[0.3, 0.1, -0.9, 0.2, 0.0]])  # a softmax-minus-one-hot-like row: rms 0.43
    frames = ternarize(e, 0.5)  # threshold 0.5 x rms = 0.21: p = {0.3}, n = {-0.9}
    assert torch.allclose(frames.decode(), torch.tensor([[0.3, 0.0, -0.9, 0.0, 0.0]]))


def test_bad_threshold_reference_names_the_choices():
    with pytest.raises(ValueError, match="threshold_of must be one of"):
        OPU(8, 16, threshold_of="sign")


def test_binary_frames_are_bool():
    e = torch.randn(4, 16)
    assert encode(e, "ternary").frames.dtype == torch.bool and encode(e, "bitplanes", bits=3).frames.dtype == torch.bool


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_planes_reconstruct_every_entry_within_half_a_level(bits):
    e = torch.randn(50, 300, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    frames = bitplanes(e, bits)
    assert frames.frames.shape == (2 * bits, 50, 300) and frames.frames.dtype == torch.bool
    peaks = torch.where(e > 0, e.clamp_min(0).amax(1, keepdim=True), e.neg().clamp_min(0).amax(1, keepdim=True))
    bound = peaks / (2 * (2**bits - 1))  # each sign's own peak
    assert bool(((frames.decode() - e).abs() <= bound * (1 + 1e-9)).all())


def test_bit_planes_code_each_sign_on_its_own_peak():
    e = torch.tensor([[0.01, 0.02, -1.0, 0.03]])  # one bit plane per sign: small positives survive
    assert torch.allclose(bitplanes(e, 2).decode(), torch.tensor([[0.01, 0.02, -1.0, 0.03]]))


def test_more_bit_planes_give_a_smaller_encoding_error():
    e = torch.randn(20, 500, generator=torch.Generator().manual_seed(0))
    errs = [encoding_error(e, bitplanes(e, k)) for k in (1, 2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01


def test_linearity_error_falls_with_bit_depth_and_is_zero_without_a_camera(errors):
    quiet = dict(
        shot_noise=False, read_noise=0.0, seed=0, exposure=0.05, encoding="ternary"
    )  # exposure low enough not to saturate
    errs = [linearity_error(OPU(D_E, D_FB, bit_depth=b, **quiet), errors) for b in (2, 4, 6, 8, 10, 12, 16)]
    # A seed whose anchor has no dark pixel at 16 bits (a speckle zero of |Rr|^2 leaves its output pixel
    # unretrievable, counted in stats["dark_pixels"], and floors the error; seed 3 has two).
    finest = OPU(D_E, D_FB, bit_depth=16, **quiet)
    finest(errors)
    assert finest.stats["dark_pixels"] == 0
    assert all(later < earlier for earlier, later in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.01 and errs[0] / errs[-1] > 100  # about 4x less per 2 bits
    assert linearity_error(OPU(D_E, D_FB, bit_depth=None, **quiet), errors) < 1e-4
    assert linearity_error(OPU(D_E, D_FB, camera=False, seed=3, encoding="ternary"), errors) < 1e-5


def test_linearity_error_grows_with_noise(errors):
    settings = [
        dict(shot_noise=False, read_noise=0.0),
        dict(shot_noise=False, read_noise=5.0),
        dict(shot_noise=True, read_noise=5.0),
        dict(shot_noise=True, read_noise=50.0),
    ]
    # Seed 0: an anchor without near-dark pixels (dividing by a dim |Rr| amplifies noise; seed 3 has two).
    errs = [
        linearity_error(OPU(D_E, D_FB, seed=0, bit_depth=None, exposure=0.05, encoding="ternary", **s), errors)
        for s in settings
    ]
    assert errs[0] < 1e-4 and all(later > earlier for earlier, later in zip(errs, errs[1:])), errs
    assert errs[-1] < 1.0  # still a usable projection at 50 electrons of read noise


def test_more_light_means_less_relative_shot_noise(errors):
    ternary = dict(seed=3, bit_depth=None, read_noise=0.0, exposure=0.05, encoding="ternary")
    dim, bright = OPU(D_E, D_FB, full_well=1_000.0, **ternary), OPU(D_E, D_FB, full_well=100_000.0, **ternary)
    assert linearity_error(bright, errors) < linearity_error(dim, errors) / 5  # sqrt(100) = 10 expected


def test_saturation_is_counted_and_warned_not_silent(errors):
    with pytest.warns(RuntimeWarning, match="saturated"):
        opu = OPU(D_E, D_FB, seed=0, exposure=1.0, shot_noise=False, read_noise=0.0)
        opu(errors)
    assert opu.stats["saturated"] > 0 and opu.stats["saturated_fraction"] > 0.01
    assert opu.totals["saturated"] == opu.stats["saturated"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dim = OPU(D_E, D_FB, seed=0, exposure=0.02)
        dim(errors)
    assert dim.stats["saturated"] == 0


def test_camera_clips_quantises_and_counts():
    cam = Camera(bit_depth=2, full_well=3.0, exposure=0.5, shot_noise=False, read_noise=0.0, adc_dither=False)
    reading = cam.read(torch.tensor([0.0, 0.4, 1.6, 2.9, 3.0, 7.0]), gain=1.0)
    assert torch.equal(reading.intensity, torch.tensor([0.0, 0.0, 2.0, 3.0, 3.0, 3.0]))
    assert reading.saturated == 2 and reading.pixels == 6


def test_the_first_calls_frames_include_the_one_off_calibration():
    opu = OPU(D_E, D_FB, seed=0, blank_frames=8)
    opu(torch.randn(3, D_E))
    assert opu.stats["calibration_frames"] == 64 + 2 * 8  # the anchor's reading, the blank frames (x, x + r)
    assert opu.stats["frames"] == 3 * opu.frames_per_vector()  # the OpticalLedger prices both
    opu(torch.randn(3, D_E))
    assert opu.stats["calibration_frames"] == 0 and opu.stats["frames"] == 3 * opu.frames_per_vector()


def test_subtractive_adc_dither_makes_rounding_unbiased():
    quiet = {"bit_depth": 8, "full_well": 255.0, "shot_noise": False, "read_noise": 0.0}  # one electron per count
    signal = torch.full((4000, 1), 0.3)  # a third of a count, on 4000 frames
    generator = torch.Generator().manual_seed(0)
    dithered = Camera(**quiet).read(signal, gain=1.0, generator=generator).intensity
    plain = Camera(**quiet, adc_dither=False).read(signal, gain=1.0).intensity
    assert float(plain.mean()) == 0.0  # always rounded down: the same error on every frame
    assert float(dithered.mean()) == pytest.approx(0.3, abs=0.02)  # sd of the mean: 0.29 / sqrt(4000)


def test_black_level_keeps_the_negative_noise_of_dark_pixels():
    settings = {"bit_depth": None, "full_well": 1e4, "shot_noise": False, "read_noise": 10.0}
    dark = torch.zeros(20000)
    clipped = Camera(**settings).read(dark, gain=1.0, generator=torch.Generator().manual_seed(0)).intensity
    kept = Camera(**settings, black_level=0.01).read(dark, gain=1.0, generator=torch.Generator().manual_seed(0))
    assert float(clipped.mean()) == pytest.approx(10.0 / (2 * torch.pi) ** 0.5, rel=0.05)  # half-normal mean
    assert float(kept.intensity.mean()) == pytest.approx(0.0, abs=0.3)


@pytest.mark.parametrize("level", [-0.1, 1.0])
def test_black_level_must_be_a_fraction_of_full_scale(level):
    with pytest.raises(ValueError, match="black_level must be a fraction of full scale"):
        Camera(black_level=level)


def test_camera_noise_has_the_stated_variance():
    cam = Camera(bit_depth=None, full_well=1e9, shot_noise=True, read_noise=10.0)
    electrons = torch.full((200_000,), 400.0, dtype=torch.float64)
    reading = cam.read(electrons, gain=1.0, generator=torch.Generator().manual_seed(0))
    assert float(reading.intensity.mean()) == pytest.approx(400, abs=0.5)
    assert float(reading.intensity.var()) == pytest.approx(400 + 100, rel=0.02)


def test_bit_depth_zero_is_an_error():
    with pytest.raises(ValueError, match="bit_depth must be an integer from 1 to 32"):
        OPU(D_E, D_FB, bit_depth=0)


def test_frames_are_counted_per_vector_and_the_anchor_reading_once(errors):
    ternary = OPU(D_E, D_FB, seed=0, camera=False)
    ternary(errors)
    ternary(errors[:5])
    assert ternary.stats["frames"] == 5 * 4  # (p, n) x (alone, with anchor)
    assert ternary.totals["frames"] == 64 + 37 * 4  # plus the anchor's reading, averaged over anchor_frames=64
    planes = OPU(D_E, D_FB, seed=0, camera=False, encoding="bitplanes", bits=3)
    planes(errors)
    assert planes.stats["frames"] == 32 * 2 * 6


def test_sizes_past_the_device_limits_are_an_error():
    with pytest.raises(ValueError, match="exceed the device.*allow_tiling=True"):
        OPU(2_000_000, 100)
    with pytest.raises(ValueError, match="exceed the device"):
        OPU(100, 3_000_000)


def test_tiling_past_the_limits_says_so_and_keeps_the_same_map(errors):
    with pytest.warns(UserWarning, match="tiled over 3 input x 2 output passes"):
        tiled = OPU(D_E, D_FB, seed=4, camera=False, encoding=None, max_input=40, max_output=300, allow_tiling=True)
    whole = OPU(D_E, D_FB, seed=4, camera=False, encoding=None)
    assert tiled.tiles == (3, 2) and whole.tiles == (1, 1)
    assert torch.allclose(tiled(errors), whole(errors), atol=1e-4)
    assert tiled.stats["frames"] == 32 * 2 * 3 * 2


def test_noise_is_reproducible_and_resumes_with_the_state_dict(errors):
    a, b = OPU(D_E, D_FB, seed=5), OPU(D_E, D_FB, seed=5)
    first = a(errors)
    assert torch.equal(first, b(errors))
    second = a(errors)
    assert not torch.equal(first, second)  # a fresh noise draw per call
    resumed = OPU(D_E, D_FB, seed=5)
    resumed.load_state_dict(b.state_dict())
    assert torch.equal(resumed(errors), second)


def test_zero_errors_give_zero_feedback_even_with_noise():
    opu = OPU(D_E, D_FB, seed=0, read_noise=50.0)
    for encoding in ("ternary", "bitplanes"):
        opu.encoding = encoding
        y = opu(torch.zeros(3, D_E))
        assert torch.equal(y, torch.zeros(3, D_FB))


def test_float64_errors_are_projected_in_float64(errors):
    opu = OPU(D_E, D_FB, seed=0, camera=False, encoding=None)
    y = opu(errors.double())
    assert y.dtype == torch.float64
    assert torch.allclose(y, errors.double() @ opu.ideal_matrix(torch.float64), atol=1e-6)


def test_sampled_rows_give_the_full_feedback_on_average():
    errors = torch.randn(16, D_E, generator=torch.Generator().manual_seed(2))
    full = OPU(D_E, D_FB, seed=1, camera=False, encoding=None)(errors)
    sampled = OPU(D_E, D_FB, seed=1, camera=False, encoding=None, sample_rows=0.25)
    mean = sum(sampled(errors) for _ in range(2000)) / 2000  # a new subset per call
    assert float((mean - full).norm() / full.norm()) < 0.06  # sd of the mean: sqrt(3 / 2000) = 0.039 per row


def test_sampled_rows_send_a_share_of_the_vectors_and_the_others_get_no_feedback():
    errors = torch.randn(40, D_E)
    opu = OPU(D_E, D_FB, seed=1, camera=False, encoding=None, sample_rows=0.25)
    out = opu(errors)
    sent = out.abs().sum(1) > 0
    assert int(sent.sum()) == 10 and opu.stats["vectors"] == 10 and opu.stats["rows"] == 40
    assert opu.stats["frames"] == 10 * opu.frames_per_vector()
    exact = OPU(D_E, D_FB, seed=1, camera=False, encoding=None)(errors)
    assert torch.allclose(out[sent], 4 * exact[sent], atol=1e-4)  # scaled by rows / sent


def test_sampled_rows_are_the_same_for_the_same_seed_and_call_and_change_from_call_to_call():
    errors = torch.randn(40, D_E)
    a, b = (OPU(D_E, D_FB, seed=1, camera=False, sample_rows=0.1) for _ in range(2))
    first = a(errors)
    assert torch.equal(first, b(errors))
    assert not torch.equal(first.abs().sum(1) > 0, a(errors).abs().sum(1) > 0)


@pytest.mark.parametrize("share", [0.0, 1.5, -0.1])
def test_sample_rows_outside_0_1_is_an_error(share):
    with pytest.raises(ValueError, match=r"sample_rows .* must be in \(0, 1\]"):
        OPU(D_E, D_FB, sample_rows=share)


def test_auto_anchor_weighs_each_frames_lit_pixels_by_its_squared_weight():
    e = torch.zeros(8, 1000)
    e[:, :400], e[:, 500] = 0.05, -1.0  # bit planes: a 400-pixel frame of weight 0.05, a 1-pixel frame of weight -1
    opu = OPU(1000, 32, seed=0)
    with pytest.raises(RuntimeError, match="call it once before"):
        opu.ideal_matrix()
    opu(e)
    # sqrt(sum w^2 L^2 / sum w^2) = sqrt((0.05^2 400^2 + 1) / (0.05^2 + 1)) = sqrt(401 / 1.0025) = 20
    assert opu.anchor_pixels == 20 and opu.settings()["anchor_pixels"] == "auto"
    opu(torch.randn(8, 1000))  # chosen once, like the exposure
    assert opu.anchor_pixels == 20


def test_auto_anchor_without_frame_power_lights_twice_the_mean_lit_pixels():
    e = torch.zeros(8, 400)
    e[:, :5], e[:, 5:10] = 1.0, -1.0  # 5 lit pixels in each of the 2 frames
    opu = OPU(400, 32, seed=0, frame_power=False)
    opu(e)
    assert opu.anchor_pixels == 10


def test_auto_anchor_is_at_least_the_minimum_and_at_most_a_quarter_of_the_input():
    one_hot = torch.eye(64)[:8]
    small = OPU(64, 32, seed=0)
    small(one_hot)
    assert small.anchor_pixels == 4  # one lit pixel per frame -> the minimum, 4
    dense = OPU(64, 32, seed=0)
    dense(torch.ones(8, 64))  # 64 lit pixels, the only weighted frame: 64, bounded by 64 // 4
    assert dense.anchor_pixels == 16


def test_frame_power_brings_every_frame_to_the_calibrated_brightness():
    e = torch.zeros(4, 1000)
    e[:, :400], e[:, 500] = 0.05, -1.0
    opu = OPU(1000, 32, seed=0)
    opu(e)  # mean lit pixels 200.5 per frame, anchor 20: every frame is brought to 220.5 pixels' worth of light
    frames = torch.zeros(3, 1000, dtype=torch.bool)
    frames[0, :1], frames[1, :200], frames[2, :800] = True, True, True
    alone, anchored = opu.frame_powers(frames, False), opu.frame_powers(frames, True)
    assert alone.tolist() == pytest.approx([220.5, 220.5 / 200, 220.5 / 800])
    assert anchored.tolist() == pytest.approx([220.5 / 21, 220.5 / 220, 220.5 / 820])
    assert OPU(1000, 32, seed=0, frame_power=False).frame_powers(frames, True) is None


def test_frame_power_leaves_the_map_unchanged():
    errors = torch.randn(16, 40)
    quiet = {"shot_noise": False, "read_noise": 0.0, "bit_depth": None, "encoding": "ternary"}
    powered, fixed = OPU(40, 24, seed=0, **quiet), OPU(40, 24, seed=0, frame_power=False, **quiet)
    assert torch.allclose(powered(errors), fixed(errors), atol=1e-4)


def test_frame_power_lifts_a_one_pixel_frame_out_of_the_shot_noise():
    generator = torch.Generator().manual_seed(0)
    errors = (0.1 * torch.randn(256, 4096, generator=generator)).softmax(1)  # nearly uniform: dense positive frames
    errors[torch.arange(256), torch.randint(0, 4096, (256,), generator=generator)] -= 1.0  # one-pixel negative ones

    def cosine_to_exact(**settings) -> float:
        opu = OPU(4096, 256, seed=0, **settings)
        out = opu(errors)
        exact = errors @ opu.ideal_matrix()
        return float(torch.nn.functional.cosine_similarity(out, exact, dim=1).mean())

    assert cosine_to_exact() > cosine_to_exact(frame_power=False, anchor_frames=1) + 0.2


def test_the_anchor_reading_is_averaged_over_anchor_frames():
    generator = torch.Generator().manual_seed(0)
    targets = torch.eye(10)[torch.randint(0, 10, (1024,), generator=generator)]
    errors = (2 * torch.randn(1024, 10, generator=generator)).softmax(1) - targets
    exact = OPU(10, 256, seed=0, camera=False)(errors)

    def shared_offset(anchor_frames: int) -> float:  # the mean error over the vectors, against the mean feedback
        opu = OPU(10, 256, seed=0, blank_frames=0, anchor_frames=anchor_frames)
        return float((opu(errors) - exact).mean(0).norm() / exact.mean(0).norm())

    assert shared_offset(64) < 0.5 * shared_offset(1)


@pytest.mark.parametrize("count", [0, -1, 2.5, True])
def test_anchor_frames_must_be_a_positive_integer(count):
    with pytest.raises(ValueError, match="anchor_frames must be a positive integer"):
        OPU(8, 16, anchor_frames=count)


def test_the_chosen_anchor_is_restored_with_the_state():
    opu, fresh = OPU(400, 32, seed=0), OPU(400, 32, seed=0)
    opu(torch.randn(8, 400))
    fresh.load_state_dict(opu.state_dict())
    errors = torch.randn(4, 400)
    assert fresh.anchor_pixels == opu.anchor_pixels and torch.equal(fresh(errors), opu(errors))


def test_dithered_bit_planes_decode_to_the_error_on_average():
    e = torch.tensor([[0.3, 0.1, -0.9, 0.2, 0.0, -0.3]])
    generator = torch.Generator().manual_seed(0)
    mean = sum(encode(e, "bitplanes", bits=1, dither=generator).decode() for _ in range(4000)) / 4000
    assert torch.allclose(mean, e, atol=0.03)  # sd of one entry's mean: 0.3 x 0.5 / sqrt(4000) = 0.0024
    one = encode(e, "bitplanes", bits=1, dither=generator).decode()
    peaks = torch.tensor([0.3, 0.3, -0.9, 0.3])  # each entry is its sign's peak or nothing; zero stays zero
    assert bool(((one[0, :4] == 0) | torch.isclose(one[0, :4], peaks)).all()) and one[0, 4] == 0


def test_dither_is_for_bit_planes_only():
    with pytest.raises(ValueError, match="dither=True applies to encoding='bitplanes'"):
        OPU(8, 16, encoding="ternary", dither=True)


def test_blank_frames_remove_most_of_the_offset_shared_by_every_vector():
    generator = torch.Generator().manual_seed(0)
    targets = torch.eye(10)[torch.randint(0, 10, (1024,), generator=generator)]
    errors = (2 * torch.randn(1024, 10, generator=generator)).softmax(1) - targets  # classifier errors, mean ~0
    exact = OPU(10, 256, seed=0, camera=False)(errors)

    def shared_offset(blank_frames: int) -> float:  # the mean error over the vectors, against the mean feedback
        opu = OPU(10, 256, seed=0, blank_frames=blank_frames, anchor_frames=1)  # one noisy anchor reading
        return float((opu(errors) - exact).mean(0).norm() / exact.mean(0).norm())

    assert shared_offset(64) < 0.7 * shared_offset(0)
    opu = OPU(10, 256, seed=0, blank_frames=8)
    opu(errors[:1])
    # the anchor's 64 frames, the blank frames (x, x + r), the vector
    assert opu.totals["frames"] == 64 + 2 * 8 + opu.frames_per_vector()


def test_an_empty_batch_gives_empty_feedback_and_calibrates():
    opu = OPU(D_E, D_FB, seed=0)
    assert opu(torch.zeros(0, D_E)).shape == (0, D_FB)
    assert opu.stats["vectors"] == 0 and opu.gain is not None
