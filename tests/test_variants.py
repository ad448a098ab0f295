"""Each learning variant of the engine changes exactly what it says (docs/learning.md measures them)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP, capture_grad, tiny_gpt2, tiny_unet
from torch import nn

from lightning_dfa import DFA
from lightning_dfa.feedback.scaling import encode_error


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
    DFA(blocks="blocks.*", output="head", backprop_top=1).attach(deep_mlp)
    F.cross_entropy(deep_mlp(x), y).backward()
    for name, param in deep_mlp.blocks[2].named_parameters():
        torch.testing.assert_close(param.grad, reference.blocks[2].get_parameter(name).grad)


def test_backprop_top_lower_blocks_get_their_slice_of_the_projection(deep_mlp, batch):
    x, y = batch
    dfa = DFA(blocks="blocks.*", output="head", backprop_top=1)
    seen = point_grads(deep_mlp, dfa, x, y)
    assert dfa.points == ["blocks.0", "blocks.1"] and dfa.backprop_points == ["blocks.2"]
    feedback = output_error(deep_mlp, x, y) @ dfa.projector.materialize()
    for name in dfa.points:
        torch.testing.assert_close(seen[name], feedback[:, dfa.layout[name]])


def test_backprop_top_keeps_no_gradient_path_into_the_dfa_blocks(deep_mlp, batch):
    x, y = batch
    dfa = DFA(blocks="blocks.*", output="head", backprop_top=2, mode="frozen").attach(deep_mlp)
    F.cross_entropy(deep_mlp(x), y).backward()
    assert deep_mlp.blocks[0][0].weight.grad is None  # frozen DFA block: nothing leaks from above
    assert deep_mlp.blocks[1][0].weight.grad is not None and dfa.backprop_points == ["blocks.1", "blocks.2"]


def test_backprop_top_must_leave_a_dfa_block(deep_mlp):
    with pytest.raises(ValueError, match=r"backprop_top=3 leaves no block to train with DFA .* use at most 2"):
        DFA(blocks="blocks.*", output="head", backprop_top=3).attach(deep_mlp)


# ---------------------------------------------------------------------- feedback scales
def test_layer_scale_multiplies_each_slice_by_sqrt_of_widest_over_width(deep_mlp, batch):
    x, y = batch
    plain = point_grads(copy.deepcopy(deep_mlp), DFA(blocks="blocks.*", output="head"), x, y)
    scaled = point_grads(deep_mlp, DFA(blocks="blocks.*", output="head", feedback_scale="layer"), x, y)
    for name, width in (("blocks.0", 7), ("blocks.1", 6), ("blocks.2", 4)):
        torch.testing.assert_close(scaled[name], plain[name] * math.sqrt(7 / width))


def test_xavier_scale_gives_std_sqrt_two_over_fan_in_plus_fan_out(deep_mlp, batch):
    x, y = batch
    plain = point_grads(copy.deepcopy(deep_mlp), DFA(blocks="blocks.*", output="head"), x, y)
    scaled = point_grads(deep_mlp, DFA(blocks="blocks.*", output="head", feedback_scale="xavier"), x, y)
    # The Gaussian projector has std 1/sqrt(d_e) with d_e = 3 classes.
    torch.testing.assert_close(scaled["blocks.2"], plain["blocks.2"] * math.sqrt(2 / (3 + 4)) * math.sqrt(3))


def test_adaptive_scale_matches_every_points_feedback_rms_to_the_errors(deep_mlp, batch):
    x, y = batch
    dfa = DFA(blocks="blocks.*", output="head", feedback_scale="adaptive", scale_momentum=0.0)
    seen = point_grads(deep_mlp, dfa, x, y)
    error_rms = output_error(deep_mlp, x, y).pow(2).mean().sqrt()
    for name in dfa.points:
        torch.testing.assert_close(seen[name].pow(2).mean().sqrt(), error_rms)


def test_adaptive_scale_is_saved_and_restored(deep_mlp, batch):
    x, y = batch
    dfa = DFA(blocks="blocks.*", output="head", feedback_scale="adaptive")
    point_grads(deep_mlp, dfa, x, y)
    restored = DFA(blocks="blocks.*", output="head", feedback_scale="adaptive")
    restored.load_state_dict(dfa.state_dict())
    assert set(restored._adaptive.factors) == set(dfa.points)


def test_scale_momentum_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"scale_momentum must be in \[0, 1\), got 1.5"):
        DFA(feedback_scale="adaptive", scale_momentum=1.5)


# ---------------------------------------------------------------------- error encodings
@pytest.mark.parametrize("encoding", ["row", "sign", "ternary"])
def test_error_encoding_projects_the_encoded_error(mlp, batch, encoding):
    x, y = batch
    dfa = DFA(blocks="blocks.*", output="head", error_encoding=encoding)
    seen = point_grads(mlp, dfa, x, y)
    feedback = encode_error(output_error(mlp, x, y), encoding) @ dfa.projector.materialize()
    torch.testing.assert_close(seen["blocks.1"], feedback[:, dfa.layout["blocks.1"]])


def test_sign_and_ternary_encodings_take_only_three_values():
    error = torch.tensor([[0.5, -0.01, 0.02, -2.0]])
    assert encode_error(error, "sign").tolist() == [[1.0, -1.0, 1.0, -1.0]]
    assert encode_error(error, "ternary").tolist() == [[0.0, 0.0, 0.0, -1.0]]  # threshold: 1 x row RMS (1.03)
    assert encode_error(error, "ternary", ternary_threshold=0.3).tolist() == [[1.0, 0.0, 0.0, -1.0]]


def test_row_encoding_gives_every_row_unit_rms():
    error = torch.tensor([[3.0, 4.0], [0.001, 0.0]])
    rms = encode_error(error, "row").pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones(2))


def test_unknown_error_encoding_lists_the_choices():
    with pytest.raises(ValueError, match=r"error_encoding must be one of \('none', 'row', 'sign', 'ternary'\)"):
        DFA(error_encoding="binary")


# ---------------------------------------------------------------------- shared feedback
def test_shared_feedback_gives_equal_width_points_one_slice(mlp, batch):
    x, y = batch
    dfa = DFA(blocks="blocks.*", output="head", shared_feedback=True)
    seen = point_grads(mlp, dfa, x, y)
    assert dfa.layout["blocks.0"] == dfa.layout["blocks.1"] == slice(0, 7)
    assert dfa.projector.out_features == 7
    torch.testing.assert_close(seen["blocks.0"], seen["blocks.1"])


# ---------------------------------------------------------------------- embeddings as points
def test_embeddings_become_feedback_points_of_a_gpt2():
    model = tiny_gpt2()
    dfa = DFA(embeddings=True).attach(model)
    ids = torch.randint(0, 64, (3, 8))
    model(ids, labels=ids).loss.backward()
    assert dfa.points == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1"]
    assert model.transformer.wpe.weight.grad[:8].abs().sum() > 0


def test_position_embedding_shared_by_the_batch_gets_the_sum_of_its_rows_feedback():
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    seen = {}
    capture_grad(model.transformer.wpe, seen, "wpe")
    dfa = DFA(embeddings=True).attach(model)
    ids = torch.randint(0, 64, (3, 8))
    model(ids, labels=ids).loss.backward()
    logits = plain(ids).logits.detach().requires_grad_()
    F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    feedback = (logits.grad.reshape(-1, 64) @ dfa.projector.materialize())[:, dfa.layout["transformer.wpe"]]
    assert seen["wpe"].shape == (1, 8, 32)
    torch.testing.assert_close(seen["wpe"], feedback.reshape(3, 8, 32).sum(0, keepdim=True))


def test_embeddings_without_embedding_modules_is_a_clear_error(mlp):
    with pytest.raises(ValueError, match="embeddings=True found no embedding module outside the blocks"):
        DFA(blocks="blocks.*", output="head", embeddings=True).attach(mlp)


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
    dfa = DFA(blocks="blocks.*", output="head", embeddings="first_block").attach(net)
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
        with DFA(blocks="blocks.*", output="head", embeddings="first_block", mode=mode).attach(net):
            F.cross_entropy(net(torch.tensor([1, 4, 7])), torch.tensor([0, 2, 1])).backward()
        grads[mode] = net.embed.weight.grad
        if mode == "frozen":
            assert all(p.grad is None for p in net.blocks.parameters())
    torch.testing.assert_close(grads["frozen"], grads["dfa"])


def test_embeddings_learn_nothing_without_a_setting_when_the_head_is_untied():
    torch.manual_seed(0)
    net = EmbeddedMLP()
    DFA(blocks="blocks.*", output="head").attach(net)
    F.cross_entropy(net(torch.tensor([1, 4])), torch.tensor([0, 2])).backward()
    assert net.embed.weight.grad is None


def test_unknown_embeddings_setting_lists_the_choices():
    with pytest.raises(ValueError, match=r"embeddings must be one of \(False, True, 'first_block'\)"):
        DFA(embeddings="first")


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
    dfa = DFA(blocks=["embed", "down", "low"], output="head", spatial_feedback=True, spatial_patch=3).attach(net)
    net(x, t).pow(2).sum().backward()
    assert (dfa.projector.in_features, dfa.projector.out_features) == (1 * 3 * 3, 4 + 4 + 6)
    assert dfa.layout == {"embed": slice(0, 4), "down": slice(4, 8), "low": slice(8, 14)}


def test_spatial_feedback_is_the_per_pixel_projection_pooled_to_each_resolution():
    torch.manual_seed(0)
    net, (x, t) = TinyConvNet(), conv_batch()
    seen = {}
    for name in ("embed", "down", "low"):
        capture_grad(getattr(net, name), seen, name)
    dfa = DFA(blocks=["embed", "down", "low"], output="head", spatial_feedback=True).attach(net)
    out = net(x, t)
    out.pow(2).sum().backward()
    error = 2 * out.detach()  # d(sum out^2)/d out, shape (2, 1, 8, 8)
    per_pixel = error.permute(0, 2, 3, 1).reshape(-1, 1) @ dfa.projector.materialize()
    maps = per_pixel.reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen["down"], maps[:, dfa.layout["down"]])
    torch.testing.assert_close(seen["low"], F.avg_pool2d(maps[:, dfa.layout["low"]], 2))
    torch.testing.assert_close(seen["embed"], maps[:, dfa.layout["embed"]].mean(dim=(2, 3)))


def test_spatial_feedback_needs_an_image_error(mlp, batch):
    DFA(blocks="blocks.*", output="head", spatial_feedback=True).attach(mlp)
    with pytest.raises(ValueError, match=r"spatial_feedback needs an image error \(B, C, H, W\).*got shape \(4, 3\)"):
        mlp(batch[0])


def test_spatial_patch_must_be_odd():
    with pytest.raises(ValueError, match="spatial_patch must be an odd positive integer"):
        DFA(spatial_feedback=True, spatial_patch=2)


def test_spatial_feedback_trains_a_diffusers_unet():
    unet = tiny_unet()
    dfa = DFA(spatial_feedback=True, embeddings=True, output="conv_out").attach(unet)
    x = torch.randn(2, 1, 8, 8)
    unet(x, torch.tensor([3, 500])).sample.pow(2).mean().backward()
    assert "time_embedding" in dfa.points and "conv_in" in dfa.points
    assert all(p.grad is not None for p in unet.down_blocks.parameters())
    assert unet.time_embedding.linear_1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- cut or carry the side inputs
def test_cut_inputs_hidden_lets_side_inputs_carry_the_blocks_gradient():
    torch.manual_seed(0)
    net, (x, t) = TinyConvNet(), conv_batch()

    class Block(nn.Module):  # a block with a side input, like a UNet block's time embedding
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, hidden, temb):
            return torch.tanh(self.conv(hidden) + temb[:, :, None, None])

    net.down = Block()
    net.forward = lambda x, t: net.head(net.up(net.low(net.down(x, net.embed(t)))))
    for cut, carries in (("all", False), ("hidden", True)):
        net.zero_grad()
        with DFA(blocks=["down", "low"], output="head", cut_inputs=cut).attach(net):
            net(x, t).pow(2).sum().backward()
        assert (net.embed.weight.grad is not None) is carries, cut


def test_unknown_cut_inputs_lists_the_choices():
    with pytest.raises(ValueError, match=r"cut_inputs must be one of \('all', 'hidden'\), got 'side'"):
        DFA(cut_inputs="side")


# ---------------------------------------------------------------------- model settings
def test_model_dfa_settings_reach_the_strategys_dfa():
    from lightning_dfa.models import MLPClassifier

    model = MLPClassifier(dfa={"backprop_top": 1, "feedback_scale": "layer"})
    assert model.configure_dfa() == {
        "blocks": "blocks.*",
        "output": "head",
        "backprop_top": 1,
        "feedback_scale": "layer",
    }
