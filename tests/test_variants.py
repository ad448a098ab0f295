"""Each learning variant of the engine changes exactly what it says (docs/learning.md measures them)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP, capture_grad, tiny_gpt2, tiny_unet
from torch import nn

from lightning_dfa import FeedbackEngine


def hidden_states(mlp, x):
    h = [x]
    for block in mlp.blocks:
        h.append(block(h[-1]))
    return h


def output_error(mlp, x, y):
    with torch.no_grad():
        logits = mlp.head(hidden_states(mlp, x)[-1])
        return (logits.softmax(-1) - F.one_hot(y, logits.shape[-1])) / len(y)


def point_grads(mlp, dfa, x, y):
    seen = {}
    for i, block in enumerate(mlp.blocks):
        capture_grad(block, seen, f"blocks.{i}")
    dfa.attach(mlp)
    F.cross_entropy(mlp(x), y).backward()
    return seen


@pytest.fixture
def deep_mlp():
    torch.manual_seed(0)
    return TinyMLP(widths=(5, 7, 6, 4))


# ---------------------------------------------------------------------- hybrid: backprop above, DFA below
def test_backprop_top_blocks_get_the_true_gradient(deep_mlp, batch):
    x, y = batch
    reference = copy.deepcopy(deep_mlp)
    F.cross_entropy(reference(x), y).backward()
    FeedbackEngine(blocks="blocks.*", output="head", backprop_top=1).attach(deep_mlp)
    F.cross_entropy(deep_mlp(x), y).backward()
    for name, param in deep_mlp.blocks[2].named_parameters():
        torch.testing.assert_close(param.grad, reference.blocks[2].get_parameter(name).grad)


def test_backprop_top_lower_blocks_get_their_slice_of_the_projection(deep_mlp, batch):
    x, y = batch
    dfa = FeedbackEngine(blocks="blocks.*", output="head", backprop_top=1)
    seen = point_grads(deep_mlp, dfa, x, y)
    assert dfa.points == ["blocks.0", "blocks.1"] and dfa.backprop_points == ["blocks.2"]
    feedback = output_error(deep_mlp, x, y) @ dfa.projector.materialize()
    for name in dfa.points:
        torch.testing.assert_close(seen[name], feedback[:, dfa.layout[name]])


def test_backprop_top_keeps_no_gradient_path_into_the_dfa_blocks(deep_mlp, batch):
    x, y = batch
    dfa = FeedbackEngine(blocks="blocks.*", output="head", backprop_top=2, mode="frozen").attach(deep_mlp)
    F.cross_entropy(deep_mlp(x), y).backward()
    assert deep_mlp.blocks[0][0].weight.grad is None  # frozen DFA block: nothing leaks from above
    assert deep_mlp.blocks[1][0].weight.grad is not None and dfa.backprop_points == ["blocks.1", "blocks.2"]


def test_backprop_top_must_leave_a_dfa_block(deep_mlp):
    with pytest.raises(ValueError, match=r"backprop_top=3 leaves no block to train with DFA .* use at most 2"):
        FeedbackEngine(blocks="blocks.*", output="head", backprop_top=3).attach(deep_mlp)


# ---------------------------------------------------------------------- embeddings as points
def test_embeddings_become_feedback_points_of_a_gpt2():
    model = tiny_gpt2()
    dfa = FeedbackEngine(embeddings=True).attach(model)
    ids = torch.randint(0, 64, (3, 8))
    model(ids, labels=ids).loss.backward()
    assert dfa.points == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1"]
    assert model.transformer.wpe.weight.grad[:8].abs().sum() > 0


def test_position_embedding_shared_by_the_batch_gets_the_sum_of_its_rows_feedback():
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    seen = {}
    capture_grad(model.transformer.wpe, seen, "wpe")
    dfa = FeedbackEngine(embeddings=True).attach(model)
    ids = torch.randint(0, 64, (3, 8))
    model(ids, labels=ids).loss.backward()
    logits = plain(ids).logits.detach().requires_grad_()
    F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    feedback = (logits.grad.reshape(-1, 64) @ dfa.projector.materialize())[:, dfa.layout["transformer.wpe"]]
    assert seen["wpe"].shape == (1, 8, 32)
    torch.testing.assert_close(seen["wpe"], feedback.reshape(3, 8, 32).sum(0, keepdim=True))


def test_embeddings_without_embedding_modules_is_a_clear_error(mlp):
    with pytest.raises(ValueError, match="embeddings=True found no embedding module outside the blocks"):
        FeedbackEngine(blocks="blocks.*", output="head", embeddings=True).attach(mlp)


class EmbeddedMLP(nn.Module):
    """Token embeddings, two tanh blocks and an untied head: the embeddings learn only if DFA lets them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_first_block_embeddings_get_the_first_blocks_feedback_carried_back_through_it():
    torch.manual_seed(0)
    net, ids, y = EmbeddedMLP(), torch.tensor([1, 4, 7]), torch.tensor([0, 2, 1])
    dfa = FeedbackEngine(blocks="blocks.*", output="head", embeddings="first_block").attach(net)
    F.cross_entropy(net(ids), y).backward()
    assert dfa.points == ["blocks.0", "blocks.1"]
    dfa.detach()
    with torch.no_grad():
        hidden = net.blocks[1](net.blocks[0](net.embed(ids)))
    logits = net.head(hidden).detach().requires_grad_()
    F.cross_entropy(logits, y).backward()
    feedback = (logits.grad @ dfa.projector.materialize())[:, dfa.layout["blocks.0"]]
    embedded = net.embed(ids).detach().requires_grad_()
    net.blocks[0](embedded).backward(feedback)  # the first block's feedback, back through that block only
    expected = torch.zeros_like(net.embed.weight).index_add_(0, ids, embedded.grad)
    torch.testing.assert_close(net.embed.weight.grad, expected)


def test_first_block_frozen_control_trains_the_embeddings_as_the_dfa_run_does():
    grads = {}
    for mode in ("dfa", "frozen"):
        torch.manual_seed(0)
        net = EmbeddedMLP()
        with FeedbackEngine(blocks="blocks.*", output="head", embeddings="first_block", mode=mode).attach(net):
            F.cross_entropy(net(torch.tensor([1, 4, 7])), torch.tensor([0, 2, 1])).backward()
        grads[mode] = net.embed.weight.grad
        if mode == "frozen":
            assert all(p.grad is None for p in net.blocks.parameters())
    torch.testing.assert_close(grads["frozen"], grads["dfa"])


def test_embeddings_learn_nothing_without_a_setting_when_the_head_is_untied():
    torch.manual_seed(0)
    net = EmbeddedMLP()
    FeedbackEngine(blocks="blocks.*", output="head").attach(net)
    F.cross_entropy(net(torch.tensor([1, 4])), torch.tensor([0, 2])).backward()
    assert net.embed.weight.grad is None


def test_unknown_embeddings_setting_lists_the_choices():
    with pytest.raises(ValueError, match=r"embeddings must be one of \(False, True, 'first_block'\)"):
        FeedbackEngine(embeddings="first")


# ---------------------------------------------------------------------- spatial feedback
class TinyConvNet(nn.Module):
    """Two conv blocks (full and half resolution), a time-like vector input, and a conv head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(1, 4)
        self.down = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh())
        self.low = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2), nn.Tanh())
        self.up = nn.Upsample(scale_factor=2)
        self.head = nn.Conv2d(6, 1, 1)

    def forward(self, x, t):
        temb = self.embed(t)
        h = self.down(x) + temb[:, :, None, None]
        return self.head(self.up(self.low(h)))


def conv_batch():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.randn(2, 1, generator=generator)


def test_spatial_feedback_has_one_row_per_pixel_and_channels_per_point():
    torch.manual_seed(0)
    net, (x, t) = TinyConvNet(), conv_batch()
    dfa = FeedbackEngine(blocks=["embed", "down", "low"], output="head", spatial_feedback=True, spatial_patch=3).attach(
        net
    )
    net(x, t).pow(2).sum().backward()
    assert (dfa.projector.in_features, dfa.projector.out_features) == (1 * 3 * 3, 4 + 4 + 6)
    assert dfa.layout == {"embed": slice(0, 4), "down": slice(4, 8), "low": slice(8, 14)}


def test_spatial_feedback_is_the_per_pixel_projection_pooled_to_each_resolution():
    torch.manual_seed(0)
    net, (x, t) = TinyConvNet(), conv_batch()
    seen = {}
    for name in ("embed", "down", "low"):
        capture_grad(getattr(net, name), seen, name)
    dfa = FeedbackEngine(blocks=["embed", "down", "low"], output="head", spatial_feedback=True).attach(net)
    out = net(x, t)
    out.pow(2).sum().backward()
    error = 2 * out.detach()  # d(sum out^2)/d out, shape (2, 1, 8, 8)
    per_pixel = error.permute(0, 2, 3, 1).reshape(-1, 1) @ dfa.projector.materialize()
    maps = per_pixel.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen["down"], maps[:, dfa.layout["down"]])
    torch.testing.assert_close(seen["low"], F.avg_pool2d(maps[:, dfa.layout["low"]], 2))
    torch.testing.assert_close(seen["embed"], maps[:, dfa.layout["embed"]].mean(dim=(2, 3)))


def test_spatial_feedback_needs_an_image_error(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head", spatial_feedback=True).attach(mlp)
    with pytest.raises(ValueError, match=r"spatial_feedback needs an image error \(B, C, H, W\).*got shape \(4, 3\)"):
        mlp(batch[0])


def test_spatial_patch_must_be_odd():
    with pytest.raises(ValueError, match="spatial_patch must be an odd positive integer"):
        FeedbackEngine(spatial_feedback=True, spatial_patch=2)


def test_spatial_feedback_trains_a_diffusers_unet():
    unet = tiny_unet()
    dfa = FeedbackEngine(spatial_feedback=True, embeddings=True, output="conv_out").attach(unet)
    x = torch.randn(2, 1, 8, 8)
    unet(x, torch.tensor([3, 500])).sample.pow(2).mean().backward()
    assert "time_embedding" in dfa.points and "conv_in" in dfa.points
    assert all(p.grad is not None for p in unet.down_blocks.parameters())
    assert unet.time_embedding.linear_1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- model settings
def test_model_dfa_settings_reach_the_strategys_dfa():
    from lightning_dfa.models import MLPClassifier

    model = MLPClassifier(dfa={"backprop_top": 1, "spatial_patch": 3})
    assert model.configure_dfa() == {
        "blocks": "blocks.*",
        "output": "head",
        "backprop_top": 1,
        "spatial_patch": 3,
    }
