"""blocks="auto" and output=None on HuggingFace GPT-2, Llama, ViT, a diffusers UNet and plain PyTorch models (a
nanoGPT, a torchvision ResNet, a CNN, an MLP): the chosen points, one DFA step, exact routing, a Lightning fit."""

import logging

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyMLP, capture_grad, quiet_trainer, tiny_gpt2, tiny_llama, tiny_unet, tiny_vit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dfa  # noqa: F401  (registers strategy="dfa")
from lightning_dfa import FeedbackEngine

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([1, 2])


class NanoBlock(nn.Module):
    """A nanoGPT block: pre-norm causal self-attention and MLP, each with a residual."""

    def __init__(self, width: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(c, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(attended)
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's layout: token and position embeddings, a ModuleList of blocks, a final norm, a tied head."""

    def __init__(self, vocab: int = 64, width: int = 32, layers: int = 4, context: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.h = nn.ModuleList(NanoBlock(width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class SmallCNN(nn.Module):
    """A ModuleList of Sequential conv blocks, then pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(a, 8, 3, padding=1), nn.ReLU()) for a in (1, 8, 8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x).flatten(1))


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 for 1-channel 8x8 images."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=3)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)
    return model


class Wrapped(pl.LightningModule):
    """A network inside a LightningModule, next to a loss module without parameters."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.model, self.loss = network, nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def lm_loss(model):
    return model(IDS, labels=IDS).loss


def vit_loss(model):
    return model(pixel_values=PIXELS, labels=LABELS).loss


def unet_loss(model):
    return ((model(PIXELS, torch.tensor([1, 5])).sample - PIXELS) ** 2).mean()


def next_token_loss(model, ids=IDS):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def image_loss(model):
    return F.cross_entropy(model(PIXELS), LABELS)


def mlp_loss(model):
    return F.cross_entropy(model(PIXELS.flatten(1)[:, :5]), LABELS)


RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]
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
    "nanogpt": (NanoGPT, next_token_loss, ["h.0", "h.1", "h.2", "h.3"], "lm_head"),
    "resnet18": (resnet18, image_loss, RESNET_STAGES, "fc"),
    "resnet18 in a LightningModule": (
        lambda: Wrapped(resnet18()),
        image_loss,
        [f"model.{stage}" for stage in RESNET_STAGES],
        "model.fc",
    ),
    "cnn": (SmallCNN, image_loss, ["blocks.0", "blocks.1", "blocks.2"], "head"),
    "mlp": (TinyMLP, mlp_loss, ["blocks.0", "blocks.1"], "head"),
}


@pytest.mark.parametrize("case", CASES)
def test_auto_finds_the_blocks_and_the_error_point(case):
    build, _, points, output = CASES[case]
    dfa = FeedbackEngine().attach(build())
    assert dfa.points == points and dfa.output == output


@pytest.mark.parametrize("case", CASES)
def test_one_dfa_step_gives_every_block_parameter_a_gradient(case):
    build, loss_fn, points, _ = CASES[case]
    model = build()
    FeedbackEngine().attach(model)
    loss_fn(model).backward()
    for point in points:
        for name, param in model.get_submodule(point).named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{point}.{name} got no feedback"


@pytest.mark.parametrize("case", CASES)
def test_no_gradient_crosses_a_block_boundary(case):
    """Zeroing one block's slice of the projection leaves exactly that block without gradient."""
    build, loss_fn, points, _ = CASES[case]
    model = build()
    dfa = FeedbackEngine().attach(model)
    loss_fn(model).backward()  # builds the projector
    silenced = points[len(points) // 2]
    dfa.projector.weight[:, dfa.layout[silenced]] = 0
    model.zero_grad()
    loss_fn(model).backward()
    for point in points:
        total = sum(p.grad.abs().sum() for p in model.get_submodule(point).parameters() if p.grad is not None)
        assert (total == 0) == (point == silenced), point


def test_named_blocks_without_output_take_the_last_module_with_parameters_after_them():
    assert FeedbackEngine(blocks="h.*").attach(NanoGPT()).output == "lm_head"
    assert FeedbackEngine(blocks=["layer1", "layer2"]).attach(resnet18()).output == "fc"


class PlainGPT(pl.LightningModule):
    """A LightningModule with no configure_dfa(): DFA must find its blocks and error point itself."""

    def __init__(self) -> None:
        super().__init__()
        self.model = NanoGPT()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return next_token_loss(self.model, batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_strategy_dfa_fits_a_plain_module_and_prints_the_chosen_points(caplog):
    module = PlainGPT()
    before = {name: p.detach().clone() for name, p in module.model.h.named_parameters()}
    trainer = quiet_trainer(strategy="dfa", max_steps=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, DataLoader(TensorDataset(IDS.repeat(2, 1)), batch_size=2))
    chosen = "DFA: 4 feedback points model.h.0 ... model.h.3 (auto), error at model.lm_head (auto), projector gaussian"
    assert chosen in caplog.text
    unchanged = [name for name, p in module.model.h.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged


def test_per_token_errors_give_per_token_feedback_rows():
    model, seen = tiny_gpt2(), {}
    capture_grad(model.transformer.h[1], seen, "h")
    dfa = FeedbackEngine().attach(model)
    capture_grad(model.lm_head, seen, "e")
    lm_loss(model).backward()
    e = seen["e"].reshape(-1, 64)
    expected = dfa.projector(e)[:, dfa.layout["transformer.h.1"]].reshape(2, 8, 32)
    torch.testing.assert_close(seen["h"], expected)


def test_per_sample_errors_are_broadcast_over_tokens_by_default():
    model, seen = tiny_vit(), {}
    capture_grad(model.vit.layers[0], seen, "h")
    dfa = FeedbackEngine().attach(model)
    capture_grad(model.classifier, seen, "e")
    vit_loss(model).backward()
    assert dfa.layout["vit.layers.0"].stop - dfa.layout["vit.layers.0"].start == 32
    per_sample = dfa.projector(seen["e"])[:, dfa.layout["vit.layers.0"]]
    torch.testing.assert_close(seen["h"], per_sample[:, None, :].expand(2, 17, 32))


def test_unet_skips_and_time_embedding_are_cut():
    model = tiny_unet()
    FeedbackEngine().attach(model)
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
        FeedbackEngine().attach(model)
        lm_loss(model).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_reentrant_checkpointing_inside_a_block_call_is_a_clear_error(mlp, batch):
    from torch.utils.checkpoint import checkpoint

    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    x = batch[0].requires_grad_()
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        checkpoint(mlp.blocks[0], x, use_reentrant=True)


@pytest.mark.slow
def test_torch_compile_gives_the_eager_gradients(mlp, batch):
    import copy

    import torch.nn.functional as F

    compiled_model = copy.deepcopy(mlp)
    FeedbackEngine(blocks="blocks.*", output="head").attach(mlp)
    FeedbackEngine(blocks="blocks.*", output="head").attach(compiled_model)
    F.cross_entropy(mlp(batch[0]), batch[1]).backward()
    F.cross_entropy(torch.compile(compiled_model)(batch[0]), batch[1]).backward()
    for (name, a), (_, b) in zip(mlp.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
