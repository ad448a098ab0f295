"""The DFA gradients are exactly the hand-computed ones, and detaching restores backprop."""

import copy as copy_module

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP, capture_grad

from lightning_dfa.feedback import FeedbackEngine


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def backprop_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return grads(model)


def test_gradients_equal_hand_computed_dfa_for_the_projector_matrix(mlp, batch):
    x, y = batch
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    F.cross_entropy(mlp(x), y).backward()

    B = dfa.projector.materialize()
    with torch.no_grad():
        h = [x]
        for block in mlp.blocks:
            h.append(block(h[-1]))
        logits = mlp.head(h[-1])
        e = (logits.softmax(-1) - F.one_hot(y, 3)) / len(y)
        f = e @ B
    for i, block in enumerate(mlp.blocks):
        delta = f[:, dfa.layout[f"blocks.{i}"]] * (1 - h[i + 1] ** 2)
        torch.testing.assert_close(block[0].weight.grad, delta.T @ h[i])
        torch.testing.assert_close(block[0].bias.grad, delta.sum(0))
    torch.testing.assert_close(mlp.head.weight.grad, e.T @ h[-1])  # the head's true gradient
    torch.testing.assert_close(mlp.head.bias.grad, e.sum(0))


def test_layout_gives_every_point_its_own_slice_in_block_order(mlp, batch):
    dfa = FeedbackEngine(blocks=["blocks.1", "blocks.0"], output="head").attach(mlp)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    assert list(dfa.layout) == ["blocks.0", "blocks.1"]
    assert dfa.layout["blocks.0"] == slice(0, 7) and dfa.layout["blocks.1"] == slice(7, 14)
    assert (dfa.projector.in_features, dfa.projector.out_features) == (3, 14)


def test_two_blocks_of_equal_width_receive_different_feedback(mlp, batch):
    seen = {}
    for i, block in enumerate(mlp.blocks):
        capture_grad(block, seen, i)
    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    assert seen[0].shape == seen[1].shape
    assert not torch.allclose(seen[0], seen[1])


def test_feedback_reaching_a_point_is_its_slice_of_the_projection(mlp, batch):
    seen = {}
    capture_grad(mlp.blocks[1], seen, "h")
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    capture_grad(mlp.head, seen, "e")
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    torch.testing.assert_close(seen["h"], dfa.projector(seen["e"])[:, dfa.layout["blocks.1"]])


def test_detach_restores_plain_backprop(mlp, batch):
    expected = backprop_grads(mlp, *batch)
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    mlp.zero_grad()
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    assert not torch.allclose(mlp.blocks[0][0].weight.grad, expected["blocks.0.0.weight"])
    dfa.detach()
    after = backprop_grads(mlp, *batch)
    for name in expected:
        torch.testing.assert_close(after[name], expected[name])


def test_two_attach_detach_cycles_leave_no_hooks(mlp):
    dfa = FeedbackEngine(blocks="blocks.*", output="head")
    for _ in range(2):
        with dfa.attach(mlp):
            assert mlp.blocks[0]._forward_hooks and mlp.head._forward_hooks
    for module in mlp.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_backprop_mode_gives_the_true_gradients(mlp, batch):
    expected = backprop_grads(mlp, *batch)
    dfa = FeedbackEngine(blocks="blocks.*", output="head", mode="backprop").attach(mlp)
    assert dfa.points == ["blocks.0", "blocks.1"]
    got = backprop_grads(mlp, *batch)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


def test_user_matrix_is_used_as_is(mlp, batch):
    matrix = torch.arange(3 * 14, dtype=torch.float32).reshape(3, 14) / 40
    dfa = FeedbackEngine(blocks="blocks.*", output="head", projector=matrix).attach(mlp)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    torch.testing.assert_close(dfa.projector.materialize(), matrix)


def test_same_seed_gives_the_same_projection_and_other_seeds_differ(mlp, batch):
    def projection(seed):
        model = TinyMLP()
        dfa = FeedbackEngine(blocks="blocks.*", output="head", seed=seed).attach(model)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        return dfa.projector.materialize()

    torch.testing.assert_close(projection(3), projection(3))
    assert not torch.allclose(projection(3), projection(4))


def test_gradient_accumulation_sums_the_dfa_gradients_of_each_micro_batch(mlp, batch):
    x, y = batch
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    separate = []
    for part in (slice(0, 2), slice(2, 4)):
        mlp.zero_grad()
        F.cross_entropy(mlp(x[part]), y[part]).backward()
        separate.append(grads(mlp))
    mlp.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        F.cross_entropy(mlp(x[part]), y[part]).backward()
    for name, grad in grads(mlp).items():
        torch.testing.assert_close(grad, separate[0][name] + separate[1][name])
    assert dfa.layout


def test_bf16_autocast_runs_and_follows_the_float32_gradients(mlp, batch):
    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    reference = grads(mlp)
    mlp.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(mlp(batch[0]), batch[1])
    loss.backward()
    for name, grad in grads(mlp).items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference[name], atol=0.02, rtol=0.05)


def test_embedding_can_be_a_feedback_point():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 10)
    )
    dfa = FeedbackEngine(blocks=["0", "1"], output="3").attach(model)
    ids = torch.tensor([[1, 2, 3]])
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert list(dfa.layout) == ["0", "1"]
    assert model[0].weight.grad[[1, 2, 3]].abs().sum() > 0
    assert model[0].weight.grad[[0, 4, 5]].abs().sum() == 0


def test_frozen_control_trains_only_the_head_and_restores_on_detach(mlp, batch):
    blocks_before = {k: v.clone() for k, v in mlp.blocks.state_dict().items()}
    dfa = FeedbackEngine(blocks="blocks.*", output="head", mode="frozen").attach(mlp)
    optimizer = torch.optim.SGD([p for p in mlp.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(mlp(batch[0]), batch[1]).backward()
        optimizer.step()
    for name, value in mlp.blocks.state_dict().items():
        assert torch.equal(value, blocks_before[name]), f"{name} changed under the frozen control"
    assert mlp.head.weight.grad.abs().sum() > 0
    dfa.detach()
    assert all(p.requires_grad for p in mlp.parameters())


def test_a_forward_whose_error_needs_no_grad_routes_nothing_and_leaves_no_state(mlp, batch):
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    mlp.head.requires_grad_(False)
    for block in mlp.blocks:
        block.requires_grad_(False)
    mlp(batch[0])
    dfa.check_routed()  # nothing pending
    mlp.requires_grad_(True)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    assert mlp.blocks[0][0].weight.grad is not None


def test_frozen_control_computes_no_projection(mlp, batch):
    dfa = FeedbackEngine(blocks="blocks.*", output="head", mode="frozen").attach(mlp)
    calls = []
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    dfa.projector.register_forward_hook(lambda *args: calls.append(1))
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    assert calls == [] and mlp.head.weight.grad is not None


# ---------------------------------------------------------------------- misuses that train correctly
def test_loss_term_on_a_returned_block_output_is_added_to_the_blocks_feedback(batch):
    class ReturnsHidden(TinyMLP):
        def forward(self, x):
            hidden = []
            for block in self.blocks:
                x = block(x)
                hidden.append(x)
            return self.head(x), hidden

    torch.manual_seed(0)
    model, seen = ReturnsHidden(), {}
    capture_grad(model.blocks[1], seen, "h")
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(model)
    capture_grad(model.head, seen, "e")
    logits, hidden = model(batch[0])
    (F.cross_entropy(logits, batch[1]) + 10 * hidden[1].pow(2).mean()).backward()
    h = hidden[1].detach()
    local = 10 * 2 * h / h.numel()  # the term's own gradient; the head's gradient must not reach the block
    torch.testing.assert_close(seen["h"], dfa.projector(seen["e"])[:, dfa.layout["blocks.1"]] + local)


def test_frozen_head_with_trainable_blocks_trains_the_blocks(mlp, batch):
    seen = {}
    capture_grad(mlp.blocks[0], seen, "h")
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    mlp.head.requires_grad_(False)
    logits = mlp(batch[0])
    logits.retain_grad()
    F.cross_entropy(logits, batch[1]).backward()
    torch.testing.assert_close(seen["h"], dfa.projector(logits.grad)[:, dfa.layout["blocks.0"]])
    assert mlp.head.weight.grad is None


def test_frozen_control_keeps_a_head_tied_to_an_embedding_point_trainable():
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    FeedbackEngine(embeddings=True, mode="frozen").attach(model)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.requires_grad
    assert not model.transformer.wpe.weight.requires_grad
    assert not any(p.requires_grad for p in model.transformer.h.parameters())
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None and model.transformer.ln_f.weight.grad is not None


def test_dfa_reused_for_a_deeper_model_builds_its_layout_again(mlp, batch):
    dfa = FeedbackEngine(blocks="blocks.*", output="head")
    with dfa.attach(mlp):
        F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    deeper = TinyMLP(widths=(5, 7, 6, 4))
    dfa.attach(deeper)
    F.cross_entropy(deeper(batch[0]), batch[1]).backward()
    assert list(dfa.layout) == ["blocks.0", "blocks.1", "blocks.2"] and dfa.projector.out_features == 17
    assert all(block[0].weight.grad is not None for block in deeper.blocks)


def test_forward_abandoned_between_the_blocks_and_the_head_leaves_no_records(mlp, batch):
    class FailsOnce(torch.nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp, self.fail = mlp, True

        def forward(self, x):
            for block in self.mlp.blocks:
                x = block(x)
            if self.fail:  # e.g. out of memory, before a retry with a smaller batch
                self.fail = False
                raise torch.OutOfMemoryError("CUDA out of memory")
            return self.mlp.head(x)

    model = FailsOnce(mlp)
    FeedbackEngine(blocks="mlp.blocks.*", output="mlp.head").attach(model)
    with pytest.raises(torch.OutOfMemoryError):
        model(batch[0])
    F.cross_entropy(model(batch[0][:2]), batch[1][:2]).backward()
    assert mlp.blocks[0][0].weight.grad is not None


def test_deep_copy_of_an_attached_model_is_an_unattached_copy(mlp, batch):
    dfa = FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    copy = copy_module.deepcopy(mlp)
    expected = backprop_grads(copy_module.deepcopy(copy), *batch)
    F.cross_entropy(copy(batch[0]), batch[1]).backward()  # plain backprop: it writes nothing into dfa
    for name, param in copy.named_parameters():
        torch.testing.assert_close(param.grad, expected[name])
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()  # the original still trains with DFA
    assert dfa.layout and not torch.allclose(mlp.blocks[0][0].weight.grad, expected["blocks.0.0.weight"])


def test_model_on_the_meta_device_runs_without_the_finiteness_check(batch):
    with torch.device("meta"):
        model = TinyMLP()
    FeedbackEngine(blocks="blocks.*", output="head").attach(model)
    model(batch[0].to("meta")).sum().backward()
    assert model.blocks[0][0].weight.grad.is_meta
