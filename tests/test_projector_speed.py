"""The projectors' fast paths give what the plain paths give: truncated and batched Hadamard transforms, the
counter generator's arbitrary rows, the OPU's sparse frames, the cheaper ternary encoding, the router's
copy-free identity."""

import pytest
import torch

import lightning_dfa.projectors.opu as opu_module
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.projectors import OPU, Structured
from lightning_dfa.projectors.encoding import ternarize
from lightning_dfa.projectors.structured import hadamard, sylvester
from lightning_dfa.projectors.tiles import gaussian_region, gaussian_rows


@pytest.mark.slow
@pytest.mark.parametrize("n, columns", [(4096, 512), (4096, 1), (4096, 4095), (65536, 9216), (16, 3), (2, 1)])
def test_hadamard_with_fewer_columns_gives_the_first_columns(n, columns):
    x = torch.randn(3, n, dtype=torch.float64)
    full = x @ sylvester(n, torch.float64) if n <= 4096 else hadamard(x.clone())
    cut = hadamard(x.clone(), columns=columns)
    assert cut.shape[1] >= columns
    assert torch.allclose(cut[:, :columns], full[:, :columns], atol=1e-9 * n**0.5)


def _structured_reference(p: Structured, x: torch.Tensor) -> torch.Tensor:
    """One output block at a time with full transforms: the definition of the module doc."""
    u = torch.zeros(x.shape[0], p.size, dtype=torch.float64)
    u[:, : p.in_features] = x.double() * p.signs[: p.in_features].double()
    u = hadamard(u)
    blocks = [hadamard(u[:, perm] * gain.double()) * p.scale for perm, gain in zip(p.perms, p.gains)]
    return torch.cat(blocks, dim=1)[:, : p.out_features]


@pytest.mark.parametrize("d_e, d_fb", [(10, 8192), (300, 8192), (100, 700), (4096, 512), (1000, 3000), (5, 3)])
def test_structured_batched_blocks_and_cut_last_block_match_the_definition(d_e, d_fb):
    p = Structured(d_e, d_fb, seed=4)
    x = torch.randn(37, d_e, dtype=torch.float64)
    assert torch.allclose(p(x), _structured_reference(p, x), atol=1e-10)


def test_structured_result_does_not_depend_on_the_chunks(monkeypatch):
    p = Structured(10, 8192, seed=2)  # 512 output blocks: grouped into batched transforms
    x = torch.randn(33, 10)
    whole = p(x)
    for chunk in (16 * 7, 16 * 64, 1 << 14):
        monkeypatch.setattr("lightning_dfa.projectors.structured.CHUNK_ELEMENTS", chunk)
        assert torch.equal(p(x), whole)


def test_counter_generator_gives_any_rows_bit_for_bit():
    full = gaussian_region(7, 2, (0, 3001), (5, 1205), std=0.3)
    rows = torch.tensor([0, 1, 2, 7, 8, 3000, 1500, 1501, 13, 13])
    assert torch.equal(gaussian_rows(7, 2, rows, (5, 1205), std=0.3), full[rows])
    assert gaussian_rows(7, 2, rows[:0], (5, 1205)).shape == (0, 1200)


def _logit_errors(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Softmax minus one-hot at a random init: one lit pixel per row once ternarised."""
    g = torch.Generator().manual_seed(seed)
    e = torch.softmax(0.5 * torch.randn(rows, classes, generator=g), 1)
    e[torch.arange(rows), torch.randint(0, classes, (rows,), generator=g)] -= 1
    return e


@pytest.mark.parametrize("settings", [{}, {"camera": False}, {"encoding": "bitplanes", "bits": 2}])
def test_opu_sparse_frames_give_the_dense_result(monkeypatch, settings):
    errors = _logit_errors(64, 2048)
    results = []
    for sparse in (opu_module.SPARSE_PIXELS, 0.0):
        monkeypatch.setattr(opu_module, "SPARSE_PIXELS", sparse)
        opu = OPU(2048, 300, seed=5, **settings)
        results.append((opu(errors), opu.stats))
    (sparse_out, sparse_stats), (dense_out, dense_stats) = results
    assert torch.allclose(sparse_out, dense_out, atol=1e-5)
    assert sparse_stats == dense_stats


def test_opu_sparse_matmul_path_on_the_lit_pixels(monkeypatch):
    errors = _logit_errors(16, 512)
    errors[:, :200] = torch.randn(16, 200)  # many lit pixels per frame: the lit-pixel matmul, not the row sums
    monkeypatch.setattr(opu_module, "SPARSE_PIXELS", 1.0)
    sparse = OPU(512, 100, seed=1, camera=False)(errors)
    monkeypatch.setattr(opu_module, "SPARSE_PIXELS", 0.0)
    assert torch.allclose(sparse, OPU(512, 100, seed=1, camera=False)(errors), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ternarize_matches_its_definition(dtype):
    e = torch.randn(50, 333, dtype=dtype)
    frames = ternarize(e, 0.5)
    t = 0.5 * e.pow(2).mean(1, keepdim=True).sqrt()
    p, n = e > t, e < -t
    mean_p = (e * p).sum(1, keepdim=True) / p.sum(1, keepdim=True).clamp_min(1)
    mean_n = (e * n).sum(1, keepdim=True) / n.sum(1, keepdim=True).clamp_min(1)
    assert torch.equal(frames.frames, torch.stack([p, n]))
    assert torch.allclose(frames.weights, torch.stack([mean_p, mean_n]), rtol=1e-5)


def test_router_output_shares_the_error_points_memory_and_gives_the_same_gradients():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(2))
    model = torch.nn.ModuleDict({"blocks": blocks, "head": torch.nn.Linear(6, 3)})
    x = torch.randn(5, 6)
    seen = {}

    def forward():
        h = x
        for block in model["blocks"]:
            h = block(h)
        return model["head"](h)

    def record(module, args, out) -> None:
        seen["head"] = out.data_ptr()

    model["head"].register_forward_hook(record)
    with FeedbackEngine(blocks="blocks.*", output="head").attach(model):
        logits = forward()
        assert logits.data_ptr() == seen["head"] and not logits._is_view()
        logits.pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
