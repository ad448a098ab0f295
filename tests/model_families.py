"""Tiny torchvision and HuggingFace models built from config (no download), with a loss each, for the family tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
CLASSES = torch.tensor([1, 3])
TOKENS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4)


def regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8)
    return RegNet(params, num_classes=4, stem_width=8)


def vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    )


def mobilenet() -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=4, width_mult=0.25)


def efficientnet() -> nn.Module:
    from torchvision.models import efficientnet

    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return efficientnet.EfficientNet(setting, 0.2, last_channel=last, num_classes=4)


def convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=4)


def swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2], num_classes=4)


def densenet() -> nn.Module:
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2, num_classes=4)


SMALL_LM = {
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**SMALL_LM, num_key_value_heads=1, tie_word_embeddings=False))


def mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**SMALL_LM, num_key_value_heads=1))


def gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL_LM))


def phi() -> nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(PhiConfig(**SMALL_LM))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(**SMALL_LM))


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    sizes = {"encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    config = BartConfig(
        vocab_size=64, d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, **sizes
    )
    return BartForConditionalGeneration(config)


def mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(
        MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=2)
    )


class Seq2Seq(nn.Module):
    """torch's own ``nn.Transformer`` between a token embedding and a head: a plain PyTorch encoder-decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.transformer = nn.Transformer(16, 2, 2, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 64)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.embed(source), self.embed(target)))


def seq2seq_loss(model: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    return F.cross_entropy(model(tokens, tokens).flatten(0, 1), tokens.flatten())


def image_loss(model: nn.Module, images: torch.Tensor = IMAGES, classes: torch.Tensor = CLASSES) -> torch.Tensor:
    return F.cross_entropy(model(images), classes)


def token_loss(model: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """The model's own loss: next token for causal LMs, masked tokens for BERT, the decoder's for T5 (as long as the
    encoder's input: the encoder's blocks share the error's (batch, sequence) rows)."""
    return model(input_ids=tokens, labels=tokens).loss


def uncached_token_loss(model: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens, use_cache=False).loss


BUILDERS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "resnet": (resnet, image_loss),
    "regnet": (regnet, image_loss),
    "vit": (vit, image_loss),
    "mobilenet_v3": (mobilenet, image_loss),
    "efficientnet": (efficientnet, image_loss),
    "convnext": (convnext, image_loss),
    "swin": (swin, image_loss),
    "densenet": (densenet, image_loss),
    "qwen2": (qwen2, token_loss),
    "mistral": (mistral, token_loss),
    "gpt_neox": (gpt_neox, token_loss),
    "phi": (phi, token_loss),
    "bert": (bert, token_loss),
    "t5": (t5, uncached_token_loss),
    "bart": (bart, uncached_token_loss),
    "mamba": (mamba, uncached_token_loss),
    "torch_transformer": (Seq2Seq, seq2seq_loss),
}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[family][0]().eval()  # eval: no dropout or stochastic depth, batch norm from running stats
