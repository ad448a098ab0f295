"""Step fidelity: a step's weight gradients under a projector against an exact map, and the step-to-step
correlation of their error (synthetic steps, and point gradients of real models)."""

import warnings

import pytest
import torch

from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.feedback.fidelity import point_gradients
from lightning_dfa.projectors import OPU
from lightning_dfa.projectors.fidelity import cosine, gradient_fidelity, step_fidelity


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


def test_point_gradients_are_the_feedback_pushed_through_each_block():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    matrix = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    engine = FeedbackEngine(blocks=["0"], output="2", projector=matrix)
    x = torch.randn(5, 4)
    grads = point_gradients(engine, model, lambda m, batch: m(batch).square().sum(), x)
    error = 2 * model(x).detach()  # d(sum y^2)/dy at the output point
    feedback = error @ matrix  # the point's output gradient: B e
    expected = torch.cat([(feedback.T @ x).flatten(), feedback.sum(0)]).double()
    assert torch.allclose(grads["0"], expected, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # nothing left for the caller's optimizer


def test_point_gradients_fix_the_forwards_random_draws():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    engine = FeedbackEngine(blocks=["0"], output="2", projector="gaussian")
    loss = lambda m, batch: m(batch).sum()  # noqa: E731
    x = torch.randn(16, 4)
    assert torch.equal(point_gradients(engine, model, loss, x, 3)["0"], point_gradients(engine, model, loss, x, 3)["0"])


def test_the_default_camera_keeps_a_language_models_block_gradients():
    """Real errors of a GPT-2 at initialisation (a nearly uniform softmax minus a one-hot: dense positive frames,
    one-pixel negative ones), real block inputs: the camera costs at most 0.02 of the gradient cosine."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_layer=2, n_embd=32, n_head=2, n_positions=32))
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (8, 33), generator=generator) for _ in range(2)]

    def loss(m, ids):
        logits = m(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def gradient_cosine(**settings) -> float:
        opu = FeedbackEngine(blocks="auto", projector={"class_path": "opu", "init_args": settings})
        got = [point_gradients(opu, model, loss, b, seed=i) for i, b in enumerate(batches)]
        exact = FeedbackEngine(blocks="auto", projector=opu.projection.projector.ideal_matrix())
        ref = [point_gradients(exact, model, loss, b, seed=i) for i, b in enumerate(batches)]
        cosines = [c for p in got[0] for c in gradient_fidelity([g[p] for g in got], [g[p] for g in ref])[0]]
        return sum(cosines) / len(cosines)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the position embedding is not a point (coverage notice)
        ideal_camera, default = gradient_cosine(camera=False), gradient_cosine()
        fixed_power_one_anchor_frame = gradient_cosine(frame_power=False, anchor_frames=1)
    assert default > ideal_camera - 0.02
    assert fixed_power_one_anchor_frame < default - 0.2  # what frame_power and the averaged anchor reading remove
