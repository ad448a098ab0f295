"""step_fidelity: the step gradient F^T A against an exact map, and its error's step-to-step correlation."""

import pytest
import torch

from lightning_dfa.projectors import OPU
from lightning_dfa.projectors.fidelity import cosine, step_fidelity


def steps(count: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(128, 16, generator=g), torch.rand(128, 4, generator=g) + 0.5) for _ in range(count)]


def test_an_exact_projector_has_unit_cosines_and_zero_error():
    matrix = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    fid = step_fidelity(lambda e: e.double() @ matrix.double(), matrix, steps(3))
    assert fid.vector_cosine == pytest.approx([1.0] * 3)
    assert fid.gradient_cosine == pytest.approx([1.0] * 3)
    assert fid.error_correlation == [0.0, 0.0]  # no error: the cosine of a zero tensor is defined as 0


def test_a_fixed_error_shared_by_every_vector_repeats_from_step_to_step():
    matrix = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    offset = torch.randn(8, generator=torch.Generator().manual_seed(2))
    fid = step_fidelity(lambda e: e @ matrix + offset, matrix, steps(3))
    assert min(fid.error_correlation) > 0.99  # the positive inputs sum the same offset every step
    assert max(fid.gradient_cosine) < 0.99


def test_independent_noise_does_not_repeat():
    matrix = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(3)
    fid = step_fidelity(lambda e: e @ matrix + torch.randn(e.shape[0], 8, generator=g), matrix, steps(2))
    assert abs(fid.error_correlation[0]) < 0.3


def test_columns_select_one_blocks_feedback():
    matrix = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    wrong_elsewhere = torch.zeros(8)
    wrong_elsewhere[4:] = 100.0
    fid = step_fidelity(lambda e: e @ matrix + wrong_elsewhere, matrix, steps(2), columns=slice(0, 4))
    assert fid.gradient_cosine == pytest.approx([1.0, 1.0])


def test_the_ideal_opu_against_its_own_matrix_is_exact():
    opu = OPU(16, 8, seed=0, camera=False, encoding=None)
    opu(torch.randn(1, 16))
    fid = step_fidelity(opu, opu.ideal_matrix(), steps(2))
    assert fid.gradient_cosine == pytest.approx([1.0, 1.0], abs=1e-5)


def test_mismatched_rows_are_refused_naming_both_counts():
    with pytest.raises(ValueError, match="128 and 3"):
        step_fidelity(lambda e: e, torch.eye(16), [(torch.randn(128, 16), torch.rand(3, 4))])


def test_cosine_of_parallel_tensors_is_one():
    assert cosine(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(1.0)
