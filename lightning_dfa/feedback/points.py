"""Choosing feedback points: module paths, glob patterns, the blocks of known model families, or repeated blocks
(``"auto"``: HuggingFace models, then diffusers UNets, then any module's repeated blocks; then the layers between
them).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from lightning_dfa._checks import closest

#: Attribute names of diffusers UNets' block containers, in forward order.
UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


class Selection(NamedTuple):
    """What DFA trains in a model: the DFA ``points``, the top blocks kept on backprop, and the error point."""

    points: list[str]
    backprop_points: list[str]
    output: str


def select(
    model: nn.Module, blocks: str | Sequence[str], output: str | None, backprop_top: int, embeddings: bool | str
) -> Selection:
    """The feedback points of ``model`` (with its embeddings if ``embeddings is True``), the top ``backprop_top``
    blocks, and the error point (``output``, or the one found for the blocks)."""
    found = resolve_points(model, blocks)
    if backprop_top >= len(found):
        raise ValueError(
            f"backprop_top={backprop_top} leaves no block to train with DFA among the {len(found)} "
            f"blocks {found}; use at most {len(found) - 1}, or mode='backprop' for plain backprop."
        )
    points, top = found[: len(found) - backprop_top], found[len(found) - backprop_top :]
    if embeddings is True:
        extra = [e for e in embedding_points(model) if not any(inside(e, p) or inside(p, e) for p in found)]
        if not extra:
            raise ValueError(
                f"embeddings=True found no embedding module outside the blocks of {type(model).__name__} "
                "(nn.Embedding, patch embeddings, a UNet's conv_in/time_embedding); name them in blocks instead."
            )
        order = module_order(model)
        points = sorted(points + extra, key=order.__getitem__)
    output = output if output is not None else auto_output(model, found)
    if output is None:
        raise ValueError(
            f"output=None and no error point found in {type(model).__name__}: it holds no HuggingFace model or "
            f"UNet, and no module with trainable parameters is registered after the last block {found[-1]!r}. "
            "Name the module whose output the loss uses (its gradient is the error), e.g. the head "
            f"(top-level children: {[n for n, _ in model.named_children()]}), with DFA(output=...), "
            "DFAStrategy(output=...) or configure_dfa()."
        )
    resolve_module(model, output, role="output")
    for point in found:
        if inside(output, point):
            raise ValueError(
                f"The output point {output!r} lies inside the feedback point {point!r}: the error must be taken "
                "after every block. Choose an output outside the blocks that runs after them, e.g. the head."
            )
    return Selection(points, top, output)


def inside(path: str, point: str) -> bool:
    """Whether module ``path`` is ``point`` or one of its submodules."""
    return path == point or below(path, point)


def below(path: str, outer: str) -> bool:
    """Whether module ``path`` is a submodule of ``outer`` (not ``outer`` itself)."""
    return path.startswith(outer + ".")


def within(path: str, outers: Sequence[str]) -> bool:
    """Whether module ``path`` is one of ``outers`` or inside one."""
    return any(inside(path, outer) for outer in outers)


def point_parameters(model: nn.Module, points: Sequence[str]) -> tuple[dict[Tensor, str], dict[Tensor, str]]:
    """The parameters of the feedback points alone, and all the others, each with the module that owns it. A
    parameter shared with a module outside the points (a head tied to the token embedding) is one of the others."""
    own: dict[Tensor, str] = {}
    others: dict[Tensor, str] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        owner = path.rpartition(".")[0]
        (own if within(owner, points) else others).setdefault(param, owner)
    return {param: owner for param, owner in own.items() if param not in others}, others


def module_order(model: nn.Module) -> dict[str, int]:
    """Each module path's position in ``model.named_modules()``: forward order for models built in order."""
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


def resolve_points(model: nn.Module, blocks: str | Sequence[str]) -> list[str]:
    """Module paths selected by ``blocks`` (``"auto"``, paths or glob patterns, ``*`` not crossing dots), in order."""
    if blocks == "auto":
        return auto_points(model)
    patterns = [blocks] if isinstance(blocks, str) else list(blocks)
    if not patterns:
        raise ValueError("blocks is empty: give module paths, glob patterns or 'auto'.")
    names = [name for name, _ in model.named_modules() if name]
    selected: list[str] = []
    for pattern in patterns:
        matches = [name for name in names if _matches(name, str(pattern))]
        if not matches:
            raise ValueError(_no_match_message(str(pattern), names, model))
        selected += [m for m in matches if m not in selected]
    order = {name: i for i, name in enumerate(names)}
    selected.sort(key=order.__getitem__)
    _check_not_nested(selected)
    return selected


def resolve_module(model: nn.Module, path: str, role: str = "output") -> nn.Module:
    """The submodule at ``path``, or a clear error listing the closest paths."""
    names = dict(model.named_modules())
    if path not in names or not path:
        raise ValueError(_no_match_message(path, [n for n in names if n], model, role=role))
    return names[path]


def auto_points(model: nn.Module) -> list[str]:
    """The blocks of a HuggingFace model (``_no_split_modules``) or of a diffusers UNet, else
    :func:`repeated_blocks`; then the layers registered between them (:func:`between_blocks`) as points of their
    own, so that nothing between two points is left without a gradient."""
    blocks = _family_blocks(model)
    return with_layers_between(model, blocks)


def _family_blocks(model: nn.Module) -> list[str]:
    for prefix, module in model.named_modules():
        classes = getattr(module, "_no_split_modules", None)
        if classes and hasattr(module, "config"):
            found = [
                _join(prefix, name) for name, sub in module.named_modules() if name and type(sub).__name__ in classes
            ]
            if found:  # nested block classes (Mamba's MambaBlock holds a MambaMixer): the outermost
                return _outermost(found)
        if _is_unet(module):
            return [_join(prefix, path) for path in _unet_block_paths(module)]
    if not any(True for _ in model.named_children()):
        raise ValueError(
            f"{type(model).__name__} has no submodules, so DFA has no blocks to train: DFA needs the model split into "
            "modules (blocks, then an output module such as the head). Build it from submodules, or train it "
            "without DFA (strategy='auto')."
        )
    repeated = repeated_blocks(model)
    if repeated:
        return repeated
    raise ValueError(
        "blocks='auto' found no HuggingFace model (with _no_split_modules), diffusers UNet, or repeated blocks "
        "(>= 2 sibling modules of one class that have submodules and trainable parameters) in "
        f"{type(model).__name__}. Name the blocks, e.g. blocks={_suggest_patterns(model)!r}; "
        f"module containers here: {candidate_containers(model)}; top-level children: "
        f"{[n for n, _ in model.named_children()]}. Set them with DFA(blocks=...), DFAStrategy(blocks=...) "
        "(--trainer.strategy.blocks=... in YAML) or the LightningModule's configure_dfa()."
    )


def auto_output(model: nn.Module, blocks: Sequence[str] = ()) -> str | None:
    """The error point of known families (an LM's output embeddings, a classifier head, a UNet's conv_out), else
    :func:`module_after_blocks`; ``None`` if neither applies."""
    for prefix, module in model.named_modules():
        if hasattr(module, "_no_split_modules") and hasattr(module, "config"):
            head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
            for name, sub in module.named_modules():
                if head is not None and sub is head or head is None and name in ("classifier", "score"):
                    return _join(prefix, name)
        if _is_unet(module) and hasattr(module, "conv_out"):
            return _join(prefix, "conv_out")
    return module_after_blocks(model, blocks) if blocks else None


def repeated_blocks(model: nn.Module) -> list[str]:
    """The blocks of any model: the largest (by trainable parameters) group of >= 2 sibling modules of one class
    with submodules and trainable parameters (a nanoGPT's ``h.*``, a MobileNet's ``features.1`` ...), in
    registration order; preferably one that leaves a module with trainable parameters registered after it for the
    error (so a torchvision model's top-level ``features`` and ``classifier`` are no group); with the groups of its
    parallel stacks (:func:`_parallel`: an encoder-decoder's ``encoder.layers.*`` and ``decoder.layers.*``);
    ``[]`` if none.
    """
    embeddings = set(embedding_points(model))
    best: dict[bool, tuple[int, str, list[str]]] = {True: (0, "", []), False: (0, "", [])}  # by: leaves an error
    groups_by_parent: dict[str, list[list[str]]] = {}
    for prefix, parent in model.named_modules():
        groups: dict[type, list[tuple[str, nn.Module]]] = {}
        for name, child in parent.named_children():
            path = _join(prefix, name)
            leaf = next(child.children(), None) is None
            if not (_no_forward(child) or leaf or path in embeddings) and _trainable_size([child]):
                groups.setdefault(type(child), []).append((path, child))
        for members in groups.values():
            size = _trainable_size([module for _, module in members])
            paths = [path for path, _ in members]
            if len(members) < 2:
                continue
            groups_by_parent.setdefault(prefix, []).append(paths)
            if size <= min(best[True][0], best[False][0]):  # ties: the first group in registration order
                continue
            leaves_error = module_after_blocks(model, paths) is not None
            if size > best[leaves_error][0]:
                best[leaves_error] = (size, prefix, paths)
    _, parent, found = best[True] if best[True][2] else best[False]  # the latter: the engine asks for the output
    if not found:
        return []
    order = module_order(model)
    for paths in (paths for other in groups_by_parent if _parallel(parent, other) for paths in groups_by_parent[other]):
        joined = sorted({*found, *paths}, key=order.__getitem__)
        if module_after_blocks(model, joined) is not None or not best[True][2]:  # a stack inside the head stays out
            found = joined
    return found


def _parallel(parent: str, other: str) -> bool:
    """Whether ``other`` is a container of the same name as ``parent`` under a sibling module (``encoder.layers`` and
    ``decoder.layers``; not ``features.1`` and ``features.2``, whose own names differ)."""
    a, b = parent.split("."), other.split(".")
    if parent == other or len(a) != len(b) or len(a) < 2 or a[-1] != b[-1]:
        return False
    return sum(x != y for x, y in zip(a, b)) == 1


def between_blocks(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    """The outermost modules with trainable parameters registered between the first and the last block, outside
    every block and containing none (a Swin's ``PatchMerging``, DenseNet's transitions, T5's
    ``encoder.final_layer_norm``); embeddings excepted. Under DFA they would get no gradient."""
    if not blocks:
        return []
    order = module_order(model)
    first, last = min(order[b] for b in blocks), max(order[b] for b in blocks)
    embeddings = set(embedding_points(model))
    found: list[str] = []
    for name, module in model.named_modules():
        if not first < order[name] < last or name in embeddings or not _trainable_size([module]):
            continue
        if within(name, [*blocks, *found]) or any(inside(block, name) for block in blocks):
            continue
        found.append(name)
    return found


def with_layers_between(model: nn.Module, blocks: Sequence[str]) -> list[str]:
    """``blocks`` with :func:`between_blocks` inserted, each after the block registered last before it."""
    order = module_order(model)
    keys = {block: (i, 0, 0) for i, block in enumerate(blocks)}
    for layer in between_blocks(model, blocks):
        before = max((b for b in blocks if order[b] < order[layer]), key=order.__getitem__)
        keys[layer] = (keys[before][0], 1, order[layer])
    return sorted(keys, key=keys.__getitem__)


def module_after_blocks(model: nn.Module, blocks: Sequence[str]) -> str | None:
    """The error point of any model: the last module with trainable parameters of its own registered after every
    block, outside them (a ResNet's ``fc``); the engine raises if it does not run after them.
    """
    order = module_order(model)
    last_block = max(order[block] for block in blocks)
    found = None
    for name, module in model.named_modules():
        in_block = any(below(name, block) for block in blocks)
        if order[name] > last_block and not in_block and any(p.requires_grad for p in module.parameters(recurse=False)):
            found = name
    return found


def _no_forward(module: nn.Module) -> bool:
    """A container that is never called (``ModuleList``, ``ModuleDict``); DenseNet's ``_DenseBlock`` is a
    ``ModuleDict`` with a ``forward`` of its own, so it can be a block."""
    return type(module).forward is nn.Module.forward


def _outermost(paths: list[str]) -> list[str]:
    return [path for path in paths if not any(below(path, other) for other in paths)]


def _trainable_size(modules: list[nn.Module]) -> int:
    """Trainable parameter count, each shared (tied) parameter once."""
    return sum({id(p): p.numel() for m in modules for p in m.parameters() if p.requires_grad}.values())


def _is_unet(module: nn.Module) -> bool:
    return all(hasattr(module, attr) for attr in UNET_BLOCKS) and isinstance(module.down_blocks, nn.ModuleList)


def _unet_block_paths(unet: nn.Module) -> list[str]:
    paths = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        paths.append("mid_block")
    return paths + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def candidate_containers(model: nn.Module, limit: int = 12) -> list[str]:
    """Outermost ModuleList / Sequential paths: where stacks of blocks usually live (for error messages)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.ModuleList, nn.Sequential)) and not within(name, found):
            found.append(name)
    return found[:limit]


def _suggest_patterns(model: nn.Module) -> list[str]:
    patterns = [f"{name}.*" for name in candidate_containers(model, limit=3)]
    layers = [name for name, child in model.named_children() if _trainable_size([child])]
    return patterns or layers[:-1] or ["<path>.*"]  # a flat model: its layers before the last (the head)


def _matches(name: str, pattern: str) -> bool:
    if name == pattern:
        return True
    if not any(ch in pattern for ch in "*?["):
        return False
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts))


def _no_match_message(pattern: str, names: list[str], model: nn.Module, role: str = "blocks") -> str:
    close = closest(pattern, names, n=5, cutoff=0.5)
    hint = f" Closest paths: {close}." if close else ""
    return (
        f"{role}: {pattern!r} matches no module of {type(model).__name__}.{hint} "
        f"Containers of blocks: {candidate_containers(model)}; top-level children: "
        f"{[n for n, _ in model.named_children()]}. Give dotted paths as in model.named_modules(), or patterns "
        "such as 'blocks.*' ('*' does not cross dots)."
    )


def _check_not_nested(paths: list[str]) -> None:
    for outer in paths:
        for inner in paths:
            if below(inner, outer):
                raise ValueError(
                    f"Feedback points {outer!r} and {inner!r} are nested; select blocks that do not contain each other."
                )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def embedding_points(model: nn.Module) -> list[str]:
    """Where inputs become features (``embeddings=True`` points): ``nn.Embedding``, patch embeddings, a UNet's stems."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or type(module).__name__.endswith("PatchEmbeddings"):
            found.append(name)
        elif _is_unet(module):
            found += [_join(name, n) for n in ("conv_in", "time_embedding") if getattr(module, n, None) is not None]
    return found
