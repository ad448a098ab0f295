"""Projector kinds: distribution of their matrices, norm preservation, determinism, state, registry, bad input."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from scipy import stats

from lightning_dfa.projectors import OPU, PROJECTORS, Gaussian, SeededGaussian, Structured, build_projector
from lightning_dfa.projectors.structured import hadamard, hadamard_factors
from lightning_dfa.projectors.tiles import counter_bits, counter_bits_reference, gaussian_region

D_E, D_FB = 256, 1024  # 262k entries: tolerances below are several standard errors wide


def ideal_opu(d_e: int, d_fb: int, seed: int = 0, **kw) -> OPU:
    return OPU(d_e, d_fb, seed=seed, camera=False, encoding=None, **kw)


KINDS = {
    "gaussian": lambda d_e, d_fb, seed=0: Gaussian(d_e, d_fb, seed=seed),
    "seeded": lambda d_e, d_fb, seed=0: SeededGaussian(d_e, d_fb, seed=seed),
    "ideal_opu": lambda d_e, d_fb, seed=0: ideal_opu(d_e, d_fb, seed=seed),
}


def matrix_of(kind: str, d_e: int = D_E, d_fb: int = D_FB, seed: int = 0) -> torch.Tensor:
    projector = KINDS[kind](d_e, d_fb, seed)
    return projector.ideal_matrix() if isinstance(projector, OPU) else projector.materialize()


@pytest.mark.parametrize("kind", [*KINDS, "structured"])
def test_entries_have_mean_zero_and_variance_one_over_d_e(kind):
    m = Structured(D_E, D_FB).materialize() if kind == "structured" else matrix_of(kind)
    # Standard errors use the number of independent Gaussians behind the matrix: every entry for the
    # i.i.d. kinds, only the d_fb diagonal gains for Structured (its entries are not independent).
    n = D_FB if kind == "structured" else m.numel()
    assert abs(float(m.mean())) < 5 * (1 / D_E**0.5) / n**0.5
    assert abs(float(m.var()) * D_E - 1) < 5 * (2 / n) ** 0.5


@pytest.mark.parametrize("kind", [*KINDS, "structured"])
def test_entries_are_gaussian(kind):
    m = Structured(D_E, D_FB).materialize() if kind == "structured" else matrix_of(kind)
    z = (m.flatten() * D_E**0.5).double().numpy()
    assert stats.kstest(z[:50_000], "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(z)) < 0.05  # excess kurtosis of a Gaussian is 0 (SE ~ 0.01 here)
    assert abs(stats.skew(z)) < 0.03


@pytest.mark.parametrize("kind", list(KINDS))
def test_columns_are_uncorrelated(kind):
    m = matrix_of(kind, d_e=1024, d_fb=256).double()
    corr = torch.corrcoef(m.T)
    off = corr[~torch.eye(256, dtype=torch.bool)]
    # Independent columns: sample correlations ~ N(0, 1/d_e); any shared structure inflates their spread.
    assert abs(float(off.mean())) < 0.01
    assert 0.9 < float(off.std()) * 1024**0.5 < 1.1


def test_different_seeds_give_independent_matrices():
    a, b = matrix_of("seeded", seed=0), matrix_of("seeded", seed=1)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01


def test_hadamard_transform_matches_the_sylvester_matrix_and_is_its_own_inverse_up_to_n():
    n = 16
    h = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)])
    x = torch.randn(3, n)
    assert torch.allclose(hadamard(x.clone()), x @ h, atol=1e-5)
    assert torch.allclose(hadamard(hadamard(x.clone())) / n, x, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.zeros(1, 12))


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """The textbook in-place fast Walsh-Hadamard transform (log2 n passes), as a reference."""
    x = x.clone()
    rows, n = x.shape
    half = 1
    while half < n:
        pairs = x.view(rows, n // (2 * half), 2, half)
        a, b = pairs[:, :, 0].clone(), pairs[:, :, 1].clone()
        pairs[:, :, 0], pairs[:, :, 1] = a + b, a - b
        half *= 2
    return x


@pytest.mark.parametrize("bits", [0, 1, 5, 7, 13, 16])
def test_kronecker_hadamard_matches_the_butterfly(bits):
    n = 1 << bits
    factors = hadamard_factors(n)
    assert max(factors, default=1) <= 64 and torch.tensor(factors).prod() == n
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard(x.clone()), _butterfly(x), atol=1e-9 * n**0.5)


@pytest.mark.parametrize("d_e", [1000, 1024])  # padded and exact transform sizes
def test_structured_preserves_norms_and_distances_like_a_jl_map(d_e):
    d_fb = 4096
    p = Structured(d_e, d_fb, seed=3)
    dense = torch.randn(100, d_e, generator=torch.Generator().manual_seed(0))  # fixed: a max over draws
    spiky = torch.eye(d_e)[:50] * 7  # one-hot errors: the worst case for a structured transform
    for x in (dense, spiky):
        ratio = (p(x).pow(2).sum(1) / x.pow(2).sum(1)) * d_e / d_fb
        assert float((ratio - 1).abs().max()) < 0.2  # max of 100 ratios: about 0.12 (0.16 at worst over 20 draws)
        # The gains are shared by all vectors: the mean ratio is one chi-square draw with d_fb dof.
        assert abs(float(ratio.mean()) - 1) < 4 * (2 / d_fb) ** 0.5
    diff = dense[:50] - dense[50:]
    ratio = (p(dense[:50]) - p(dense[50:])).pow(2).sum(1) / diff.pow(2).sum(1) * d_e / d_fb
    assert float((ratio - 1).abs().max()) < 0.2


def test_structured_feedback_entry_variance_is_norm_squared_over_d_e_for_any_error():
    x = torch.zeros(1, 300)
    x[0, :3] = torch.tensor([3.0, -4.0, 12.0])  # |x|^2 = 169
    y = Structured(300, 8192, seed=1)(x)
    assert abs(float(y.var()) / (169 / 300) - 1) < 0.05


def test_structured_runs_in_chunks_with_the_same_result(monkeypatch):
    p = Structured(100, 700, seed=2)
    x = torch.randn(37, 100)
    whole = p(x)
    monkeypatch.setattr("lightning_dfa.projectors.structured.CHUNK_ELEMENTS", 128 * 5)
    assert torch.equal(p(x), whole)


def test_seeded_matrix_is_the_same_whatever_the_tile_size():
    reference = SeededGaussian(700, 1300, seed=5, tile=4096)
    x = torch.randn(9, 700)
    for tile in (1, 512, 1000, 8192):
        other = SeededGaussian(700, 1300, seed=5, tile=tile)
        assert torch.equal(other.materialize(), reference.materialize())
        assert torch.allclose(other(x), reference(x), atol=1e-5)  # only the summation order differs


def test_counter_generator_integer_stream_matches_its_python_specification():
    bits = counter_bits(3, 1, (5, 9), (100, 107))
    for i in range(4):
        for j in range(7):
            assert int(bits[i, j]) & (2**64 - 1) == counter_bits_reference(3, 1, 5 + i, 100 + j)


def test_counter_generator_is_the_same_for_any_region_and_tile():
    whole = counter_bits(7, 0, (0, 40), (0, 900))
    assert torch.equal(counter_bits(7, 0, (13, 29), (250, 777)), whole[13:29, 250:777])
    assert not torch.equal(counter_bits(7, 1, (0, 40), (0, 900)), whole)  # another stream
    big = gaussian_region(7, 0, (0, 80), (0, 900))
    for rows, cols in (((0, 80), (0, 1)), ((1, 79), (3, 900)), ((17, 18), (0, 900)), ((2, 64), (512, 899))):
        assert torch.equal(gaussian_region(7, 0, rows, cols), big[rows[0] : rows[1], cols[0] : cols[1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counter_generator_is_the_same_on_cpu_and_cuda():
    cpu = counter_bits(11, 2, (0, 300), (0, 5000))
    assert torch.equal(counter_bits(11, 2, (0, 300), (0, 5000), device="cuda").cpu(), cpu)  # integers: exact
    a = gaussian_region(11, 2, (0, 600), (0, 5000), std=0.1)
    b = gaussian_region(11, 2, (0, 600), (0, 5000), std=0.1, device="cuda").cpu()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # float32 log/cos/sin may differ by an ulp
    p = SeededGaussian(600, 5000, seed=11)
    assert torch.allclose(p.materialize(), p.to("cuda").materialize().cpu(), rtol=1e-5, atol=1e-7)


def test_seeded_default_generator_is_the_counter_and_the_legacy_ones_remain():
    assert SeededGaussian(10, 20).generator == "counter"
    assert torch.equal(SeededGaussian(10, 20, seed=4).materialize(), gaussian_region(4, 0, (0, 10), (0, 20), 10**-0.5))
    legacy = SeededGaussian(10, 20, seed=4, generator="cpu").materialize()
    assert legacy.shape == (10, 20) and not torch.equal(legacy, SeededGaussian(10, 20, seed=4).materialize())
    with pytest.raises(ValueError, match="generator must be one of"):
        SeededGaussian(10, 20, generator="philox")


def test_seeded_forward_multiplies_by_its_materialized_matrix():
    p = SeededGaussian(600, 900, seed=1, tile=512)
    m = p.materialize(torch.float64)
    assert torch.equal(p(torch.eye(600, dtype=torch.float64)), m)
    x = torch.randn(5, 600, dtype=torch.float64)
    assert torch.allclose(p(x), x @ m, atol=1e-10)


def test_seeded_matrix_is_the_same_in_every_dtype_where_representable():
    p = SeededGaussian(64, 96, seed=0)
    assert torch.equal(p.materialize(torch.float64), p.materialize(torch.float32).double())
    assert torch.equal(p(torch.eye(64, dtype=torch.float64)).float(), p(torch.eye(64)))
    assert torch.equal(p(torch.eye(64, dtype=torch.bfloat16)), p.materialize().bfloat16())


@pytest.mark.parametrize("kind", ["seeded", "structured", "opu"])
def test_state_dict_holds_no_matrix_and_reloads_the_same_projection(kind):
    a = build_projector(kind, 64, 200, seed=7)
    state = a.state_dict()
    assert all(not isinstance(v, torch.Tensor) or v.numel() == 0 for v in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    b = build_projector(kind, 64, 200, seed=7)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    x = torch.randn(4, 64)
    torch.manual_seed(0)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="does not match"):
        build_projector(kind, 64, 200, seed=8).load_state_dict(state)


def test_seeded_resumes_with_another_tile_size_and_projects_the_same():
    saved, resumed = SeededGaussian(64, 200, seed=1, tile=512), SeededGaussian(64, 200, seed=1, tile=2048)
    resumed.load_state_dict(saved.state_dict())  # the tile size is a memory setting, not part of the matrix
    x = torch.randn(4, 64)
    torch.testing.assert_close(resumed(x), saved(x), rtol=0, atol=0)


_CHILD = """
import torch
from lightning_dfa.projectors import OPU, SeededGaussian, Structured
x = torch.linspace(-1, 1, 3 * 130).reshape(3, 130)
for p in (SeededGaussian(130, 700, seed=11), Structured(130, 700, seed=11), OPU(130, 700, seed=11)):
    print(repr(p(x).double().sum().item()), repr(p(x).double().abs().sum().item()))
"""


@pytest.mark.slow
def test_two_processes_compute_the_same_projections():
    runs = [subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True) for _ in "ab"]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.count("\n") == 3
    here = []
    x = torch.linspace(-1, 1, 3 * 130).reshape(3, 130)
    for p in (SeededGaussian(130, 700, seed=11), Structured(130, 700, seed=11), OPU(130, 700, seed=11)):
        here.append(f"{p(x).double().sum().item()!r} {p(x).double().abs().sum().item()!r}")
    # The OPU's second call here has another noise draw than the child's first: compare its first call only.
    assert runs[0].stdout.splitlines()[:2] == here[:2]
    assert runs[0].stdout.splitlines()[2].split()[0] == here[2].split()[0]


def test_registry_accepts_names_configs_and_dotted_class_paths():
    assert {"gaussian", "seeded", "structured", "opu"} <= set(PROJECTORS)
    assert isinstance(build_projector("seeded", 10, 30, seed=0), SeededGaussian)
    assert isinstance(build_projector("structured", 10, 30, seed=0), Structured)
    opu = build_projector({"class_path": "opu", "init_args": {"bit_depth": 4}}, 10, 30, seed=2)
    assert isinstance(opu, OPU) and opu.camera.bit_depth == 4 and opu.seed == 2
    dotted = build_projector({"class_path": "lightning_dfa.projectors.OPU", "init_args": {"camera": False}}, 10, 30, 0)
    assert isinstance(dotted, OPU) and not dotted.camera.enabled


@pytest.mark.parametrize("kind", ["seeded", "structured", "opu"])
def test_non_finite_rows_give_nan_feedback_with_a_warning(kind):
    p = build_projector(kind, 16, 40, seed=0)
    x = torch.randn(4, 16)
    x[1, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 error rows are not finite"):
        y = p(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("kind", ["seeded", "structured", "opu"])
def test_zero_error_rows_give_zero_feedback(kind):
    p = build_projector(kind, 16, 40, seed=0)
    x = torch.randn(3, 16)
    x[1] = 0
    y = p(x)
    assert torch.isfinite(y).all() and torch.equal(y[1], torch.zeros(40))


@pytest.mark.parametrize("kind", ["seeded", "structured"])
def test_wrong_error_shape_is_rejected(kind):
    with pytest.raises(ValueError, match=r"expects errors of shape \(N, 16\)"):
        build_projector(kind, 16, 40, seed=0)(torch.randn(3, 15))
