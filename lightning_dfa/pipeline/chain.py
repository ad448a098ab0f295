"""A model seen as a chain ``embed -> blocks -> head``: what a pipeline splitter needs to know to cut it.

The cut points are block boundaries (the DFA points, found as ``blocks="auto"`` finds them); only the hidden state
crosses a cut. Side inputs a block needs (a causal mask, position ids) are recomputed on every stage from the
hidden state, so they are never sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: ``embed(root, *inputs) -> hidden``: the modules before the blocks, on the first stage.
Embed = Callable[..., Tensor]
#: ``context(root, hidden) -> kwargs``: the side inputs every block of a stage gets (computed once per forward).
Context = Callable[[nn.Module, Tensor], dict[str, Any]]
#: ``block(module, hidden, **context) -> output``: one block (its output: a tensor or a tuple starting with one).
Block = Callable[..., Any]
#: ``head(root, hidden) -> output``: the modules after the blocks, on the last stage (the loss reads this).
Head = Callable[[nn.Module, Tensor], Any]


def _no_context(root: nn.Module, hidden: Tensor) -> dict[str, Any]:
    return {}


def _call_block(module: nn.Module, hidden: Tensor, **context: Any) -> Any:
    return module(hidden, **context)


@dataclass(frozen=True)
class Chain:
    """How a model runs as ``embed`` (modules ``before``), the ``blocks`` in order, then ``head`` (modules ``after``).

    ``root`` in the callables is the model itself or a stage holding some of its modules under their original
    paths (``root.get_submodule(path)`` works in both).

    Example (a model whose forward is ``head(norm(blocks(embed(x))))``)::

        Chain(
            before=["embed"], blocks=[f"blocks.{i}" for i in range(4)], after=["norm", "head"],
            embed=lambda root, x: root.embed(x),
            head=lambda root, h: root.head(root.norm(h)),
        )
    """

    before: Sequence[str]
    blocks: Sequence[str]
    after: Sequence[str]
    embed: Embed
    head: Head
    context: Context = _no_context
    block: Block = _call_block
    #: Modules that hold no parameters of their own but that every stage needs (a rotary embedding).
    shared: Sequence[str] = field(default_factory=tuple)
    #: Modules that run after a block, before the next one, on the block's stage (an ``nn.Sequential``'s activation
    #: or frozen layer between two blocks): they run on the block's output as the model does, and no gradient
    #: reaches them, as in one process.
    trailing: Mapping[str, Sequence[str]] = field(default_factory=dict)


def chain_of(model: nn.Module, blocks: Sequence[str]) -> Chain:
    """The chain of ``model`` with these blocks: an ``nn.Sequential``, a HuggingFace GPT-2 or Llama causal LM.

    Any other model: give its :class:`Chain` (``split_model(..., chain=...)``).
    """
    if isinstance(model, nn.Sequential):
        return _sequential_chain(model, blocks)
    family = type(model).__name__
    if family in _FAMILIES:
        return _FAMILIES[family](model, blocks)
    raise ValueError(
        f"split_model does not know how {family} runs its blocks: the pipeline needs the model as a chain "
        f"embed -> blocks -> head. Known: nn.Sequential, {sorted(_FAMILIES)}. For another model pass "
        "chain=Chain(before=[...], blocks=[...], after=[...], embed=..., head=...) (lightning_dfa.pipeline.Chain)."
    )


def _sequential_chain(model: nn.Sequential, blocks: Sequence[str]) -> Chain:
    children = [name for name, _ in model.named_children()]
    outside = [b for b in blocks if b not in children]
    if outside:
        raise ValueError(
            f"The blocks {outside} are not direct children of the nn.Sequential (children: {children}); the pipeline "
            "cuts a Sequential between its children. Name blocks among them (blocks=[...])."
        )
    first, last = children.index(blocks[0]), children.index(blocks[-1])
    before, after = children[:first], children[last + 1 :]
    trailing: dict[str, list[str]] = {}
    for name in children[first : last + 1]:
        if name in blocks:
            trailing[name] = current = []
        else:
            current.append(name)  # a child between two blocks runs after the block before it

    def run(root: nn.Module, names: Sequence[str], value: Any) -> Any:
        for name in names:
            value = root.get_submodule(name)(value)
        return value

    return Chain(
        before=before,
        blocks=list(blocks),
        after=after,
        embed=lambda root, x: run(root, before, x),
        head=lambda root, h: run(root, after, h),
        trailing=trailing,
    )


def _hf_prefixes(model: nn.Module, blocks: Sequence[str], layers: str) -> str:
    expected = [f"{layers}.{i}" for i in range(len(blocks))]
    if list(blocks) != expected[: len(blocks)] or len(blocks) != len(model.get_submodule(layers)):
        raise ValueError(
            f"The pipeline cuts {type(model).__name__} between its decoder layers: blocks must be all of "
            f"{layers}.* in order, got {list(blocks)}."
        )
    return layers


def _gpt2_chain(model: nn.Module, blocks: Sequence[str]) -> Chain:
    from transformers.masking_utils import create_causal_mask

    _hf_prefixes(model, blocks, "transformer.h")
    config = model.config

    def embed(root: nn.Module, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden = root.get_submodule("transformer.wte")(input_ids) + root.get_submodule("transformer.wpe")(positions)
        return root.get_submodule("transformer.drop")(hidden)

    def context(root: nn.Module, hidden: Tensor) -> dict[str, Any]:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
        )
        return {"attention_mask": mask, "position_ids": positions, "use_cache": False}

    def block(module: nn.Module, hidden: Tensor, attention_mask: Any, **rest: Any) -> Any:
        return module(hidden, None, attention_mask, None, **rest)  # (hidden, cache, mask, encoder states): HF's order

    def head(root: nn.Module, hidden: Tensor) -> Tensor:
        return root.get_submodule("lm_head")(root.get_submodule("transformer.ln_f")(hidden))

    return Chain(
        before=["transformer.wte", "transformer.wpe", "transformer.drop"],
        blocks=list(blocks),
        after=["transformer.ln_f", "lm_head"],
        embed=embed,
        head=head,
        context=context,
        block=block,
    )


def _llama_chain(model: nn.Module, blocks: Sequence[str]) -> Chain:
    from transformers.masking_utils import create_causal_mask

    _hf_prefixes(model, blocks, "model.layers")
    config = model.config

    def embed(root: nn.Module, input_ids: Tensor) -> Tensor:
        return root.get_submodule("model.embed_tokens")(input_ids)

    def context(root: nn.Module, hidden: Tensor) -> dict[str, Any]:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
        )
        rotary = root.get_submodule("model.rotary_emb")(hidden, positions)
        return {"attention_mask": mask, "position_ids": positions, "position_embeddings": rotary}

    def head(root: nn.Module, hidden: Tensor) -> Tensor:
        return root.get_submodule("lm_head")(root.get_submodule("model.norm")(hidden))

    return Chain(
        before=["model.embed_tokens"],
        blocks=list(blocks),
        after=["model.norm", "lm_head"],
        embed=embed,
        head=head,
        context=context,
        shared=["model.rotary_emb"],
    )


_FAMILIES: dict[str, Callable[[nn.Module, Sequence[str]], Chain]] = {
    "GPT2LMHeadModel": _gpt2_chain,
    "LlamaForCausalLM": _llama_chain,
}
