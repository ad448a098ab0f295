"""Reading and rewriting module inputs and outputs: tensors, tuples (HF 4.x blocks), nested skips."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor


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
