"""blocks="auto" on HuggingFace GPT-2, Llama, ViT and a diffusers UNet: one DFA step, exact routing."""

import pytest
import torch
from conftest import capture_grad, tiny_gpt2, tiny_llama, tiny_unet, tiny_vit

from lightning_dfa import DFA

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def lm_loss(model):
    return model(IDS, labels=IDS).loss


def vit_loss(model):
    return model(pixel_values=PIXELS, labels=torch.tensor([1, 2])).loss


def unet_loss(model):
    return ((model(PIXELS, torch.tensor([1, 5])).sample - PIXELS) ** 2).mean()


CASES = {
    "gpt2": (tiny_gpt2, lm_loss, ["transformer.h.0", "transformer.h.1"], "lm_head"),
    "llama": (tiny_llama, lm_loss, ["model.layers.0", "model.layers.1"], "lm_head"),
    "vit": (tiny_vit, vit_loss, ["vit.embeddings", "vit.layers.0", "vit.layers.1"], "classifier"),
    "unet": (
        tiny_unet,
        unet_loss,
        ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"],
        "conv_out",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_auto_finds_the_blocks_and_the_error_point(case):
    build, _, points, output = CASES[case]
    dfa = DFA().attach(build())
    assert dfa.points == points and dfa.output == output


@pytest.mark.parametrize("case", CASES)
def test_one_dfa_step_gives_every_block_parameter_a_gradient(case):
    build, loss_fn, points, _ = CASES[case]
    model = build()
    DFA().attach(model)
    loss_fn(model).backward()
    for point in points:
        for name, param in model.get_submodule(point).named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{point}.{name} got no feedback"


@pytest.mark.parametrize("case", CASES)
def test_no_gradient_crosses_a_block_boundary(case):
    """Zeroing one block's slice of the projection leaves exactly that block without gradient."""
    build, loss_fn, points, _ = CASES[case]
    model = build()
    dfa = DFA().attach(model)
    loss_fn(model).backward()  # builds the projector
    silenced = points[len(points) // 2]
    dfa.projector.weight[:, dfa.layout[silenced]] = 0
    model.zero_grad()
    loss_fn(model).backward()
    for point in points:
        total = sum(p.grad.abs().sum() for p in model.get_submodule(point).parameters() if p.grad is not None)
        assert (total == 0) == (point == silenced), point


def test_per_token_errors_give_per_token_feedback_rows():
    model, seen = tiny_gpt2(), {}
    capture_grad(model.transformer.h[1], seen, "h")
    dfa = DFA().attach(model)
    capture_grad(model.lm_head, seen, "e")
    lm_loss(model).backward()
    e = seen["e"].reshape(-1, 64)
    expected = dfa.projector(e)[:, dfa.layout["transformer.h.1"]].reshape(2, 8, 32)
    torch.testing.assert_close(seen["h"], expected)


def test_per_sample_errors_are_broadcast_over_tokens_by_default():
    model, seen = tiny_vit(), {}
    capture_grad(model.vit.layers[0], seen, "h")
    dfa = DFA().attach(model)
    capture_grad(model.classifier, seen, "e")
    vit_loss(model).backward()
    assert dfa.layout["vit.layers.0"].stop - dfa.layout["vit.layers.0"].start == 32
    per_sample = dfa.projector(seen["e"])[:, dfa.layout["vit.layers.0"]]
    torch.testing.assert_close(seen["h"], per_sample[:, None, :].expand(2, 17, 32))


def test_per_sample_errors_can_flatten_token_outputs():
    model = tiny_vit()
    dfa = DFA(sequence_feedback="flatten").attach(model)
    vit_loss(model).backward()
    assert dfa.layout["vit.layers.0"].stop - dfa.layout["vit.layers.0"].start == 17 * 32


def test_unet_skips_and_time_embedding_are_cut():
    model = tiny_unet()
    DFA().attach(model)
    unet_loss(model).backward()
    for name, param in model.time_embedding.named_parameters():
        assert param.grad is None, f"time_embedding.{name} got a gradient through a block input"
    assert model.conv_in.weight.grad is None
    assert model.conv_out.weight.grad.abs().sum() > 0  # the head trains with its true gradient


def enable_checkpointing(model, use_reentrant):
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hf_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    plain, checkpointed = tiny_gpt2(), tiny_gpt2()
    enable_checkpointing(checkpointed, use_reentrant=use_reentrant)
    for model in (plain, checkpointed):
        model.train()
        DFA().attach(model)
        lm_loss(model).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_reentrant_checkpointing_inside_a_block_call_is_a_clear_error(mlp, batch):
    from torch.utils.checkpoint import checkpoint

    DFA(blocks="blocks.*", output="head").attach(mlp)
    x = batch[0].requires_grad_()
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        checkpoint(mlp.blocks[0], x, use_reentrant=True)


def test_torch_compile_gives_the_eager_gradients(mlp, batch):
    import copy

    import torch.nn.functional as F

    compiled_model = copy.deepcopy(mlp)
    DFA(blocks="blocks.*", output="head").attach(mlp)
    DFA(blocks="blocks.*", output="head").attach(compiled_model)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    F.cross_entropy(torch.compile(compiled_model)(batch[0]), batch[1]).backward()
    for (name, a), (_, b) in zip(mlp.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
