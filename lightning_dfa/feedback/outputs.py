"""Reading and rewriting module inputs and outputs (tensors, tuples of HF 4.x blocks, nested skips): the hooks
that cut a block's inputs from the graph."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dfa import _compat


def first_tensor(output: Any, where: str) -> Tensor:
    """The hidden state of a module's output: the tensor itself, or the first item of a tuple/list."""
    value = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(value, Tensor):
        kind = (
            type(value).__name__
            if value is output
            else f"{type(output).__name__} whose first item is {type(value).__name__}"
        )
        raise TypeError(
            f"{where} returned a {kind}; a feedback or output point must return a tensor or a tuple "
            "starting with one. Select the submodule that produces the hidden state instead."
        )
    return value


def replace_first(output: Any, value: Tensor) -> Any:
    """``output`` with its hidden state replaced by ``value`` (same container type)."""
    if isinstance(output, Tensor):
        return value
    return type(output)([value, *output[1:]]) if isinstance(output, list) else (value, *output[1:])


def detach_all(value: Any) -> Any:
    """Detach every tensor inside nested tuples (named ones too), lists and dicts (block inputs, skips, time
    embeddings, DenseNet's list of earlier features, a ``ModelOutput``); containers keep their type, and one that
    holds no tensor is returned as it is."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        items = [detach_all(v) for v in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        return type(value)(items) if type(value) in (tuple, list) else _rebuilt(value, items)
    if isinstance(value, dict):
        items = {k: detach_all(v) for k, v in value.items()}
        if all(items[k] is v for k, v in value.items()):
            return value
        copy = _copied(value)
        for k, v in items.items():
            copy[k] = v
        return copy
    return value


def _rebuilt(value: tuple | list, items: list) -> tuple | list:
    """A tuple or list subclass with new items; one that cannot be rebuilt so becomes a plain tuple or list."""
    try:
        return type(value)(items)
    except TypeError:
        return tuple(items) if isinstance(value, tuple) else items


def _copied(value: dict) -> dict:
    """A shallow copy of a dict that keeps its type (a ``ModelOutput``, an ``OrderedDict``)."""
    try:
        return copy.copy(value)
    except (TypeError, ValueError, AttributeError):  # a dict subclass that cannot be copied: a plain dict
        return dict(value)


def any_requires_grad(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(any_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(any_requires_grad(v) for v in value.values())
    return False


def detach_inputs(args: tuple, kwargs: dict, which: str) -> tuple[tuple, dict]:
    """Detach a call's inputs: ``"all"``, or every ``"side"`` one (time embeddings, skips, masks), keeping the
    hidden state (the first positional argument, else the first keyword argument)."""
    if which == "all":
        return detach_all(args), detach_all(kwargs)
    if args:
        return (args[0], *detach_all(args[1:])), detach_all(kwargs)
    main = next(iter(kwargs), None)
    return args, {k: v if k == main else detach_all(v) for k, v in kwargs.items()}


def cut_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A DFA point's forward pre-hook: detach every input, so no gradient crosses into the block from outside."""
    if torch.is_grad_enabled():
        args, kwargs = detach_inputs(args, kwargs, "all")
        if args and isinstance(args[0], Tensor) and torch.is_floating_point(args[0]) and reentrant(module):
            # Reentrant checkpointing only runs backward through positional inputs that require grad:
            # here (and only here) the block input must require grad, at the cost of its unused gradient.
            args = (args[0].requires_grad_(), *args[1:])
        return args, kwargs
    if any_requires_grad((args, kwargs)):
        raise RuntimeError(
            "A feedback point runs without grad on inputs that require grad: this is reentrant activation "
            "checkpointing, which DFA cannot route feedback through. Use non-reentrant checkpointing: "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
            "or torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
        )
    return None


def cut_side_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The pre-hook of a block whose hidden state keeps its gradient (``backprop_top``, ``"first_block"``):
    inputs from DFA blocks (skips, time embeddings) are detached."""
    return detach_inputs(args, kwargs, "side") if torch.is_grad_enabled() else None


def reentrant(module: nn.Module) -> bool:
    """Whether a HuggingFace layer checkpoints its ``forward`` with reentrant checkpointing."""
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return False
    return _compat.hf_reentrant_checkpointing(module)


def swap_copies(value: Any, handed: dict[int, tuple[Tensor, Tensor]]) -> Any:
    """``value`` with every detached copy of a point's output replaced by the output itself (in place in dicts,
    e.g. a HuggingFace ``ModelOutput``)."""
    if isinstance(value, Tensor):
        copy, original = handed.get(id(value), (None, None))
        return original if copy is value else value
    if isinstance(value, list) or isinstance(value, tuple) and not hasattr(value, "_fields"):
        return type(value)(swap_copies(item, handed) for item in value)
    if isinstance(value, dict):
        for key, item in list(value.items()):
            swapped = swap_copies(item, handed)
            if swapped is not item:
                value[key] = swapped
    return value


def trains(block: nn.Module, name: str, hidden: Tensor) -> bool:
    """Whether point ``name``'s output ``hidden`` carries a gradient into ``block``; a clear error where it cannot
    although the block has trainable parameters."""
    if hidden.requires_grad:
        return True
    if not any(p.requires_grad for p in block.parameters()):
        return False  # a frozen block: nothing to train
    if not (hidden.is_floating_point() or hidden.is_complex()):
        raise TypeError(
            f"Feedback point {name!r} has trainable parameters but returns a {hidden.dtype} tensor, which "
            "cannot carry a gradient. Select as point the module whose output is the floating-point hidden "
            "state (a tuple may carry other values after it)."
        )
    raise RuntimeError(
        f"Feedback point {name!r} has trainable parameters but its output does not require grad; was it "
        "run under torch.no_grad() or reentrant checkpointing?"
    )
