"""Which trainable parameters a DFA layout trains, and how: none may be left without a gradient unreported, none
may get one by accident.

Under DFA a point's parameters learn from its feedback, everything after the last point (the head, a final norm)
from its true gradient, and nothing else gets a gradient: a layer registered before the first point or between
two points would silently never train. :func:`check_coverage` names such parameters at ``attach`` with the fix
(a :class:`CoverageWarning`, or an error with ``strict=True``); :func:`watch_stray_gradients` catches one that gets a
gradient all the same (the loss reaches it around the points, e.g. through a dense connection).

Example::

    coverage = check_coverage(model, ["layer1", "layer2"], [], "fc")   # warns: conv1, bn1 never train
    coverage.untrained()                                               # ['conv1.weight', 'bn1.weight', ...]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dfa import _compat
from lightning_dfa.feedback.hooks import EngineHook
from lightning_dfa.feedback.points import embedding_points, inside, module_order, within

#: Where a parameter's gradient comes from, strongest first: a parameter shared by several modules takes the first.
SOURCES = ("true", "feedback", "before", "between")
UNTRAINED = ("before", "between")


class CoverageWarning(UserWarning):
    """A trainable parameter gets no gradient under the DFA layout, or gets one by accident."""


@dataclass(frozen=True)
class Coverage:
    """Each trainable parameter (by name) with the source of its gradient (``"feedback"``: inside a DFA point;
    ``"true"``: the head and what is registered after the last point, backprop blocks, and with
    ``embeddings="first_block"`` what precedes the first point; ``"before"`` / ``"between"``: no gradient) and the
    module that owns it. Built from registration order at attach; the first training forward corrects ``source`` by
    the order the modules ran in."""

    source: dict[str, str]
    owner: dict[str, str]
    points: list[str]
    blocks: list[str]  # the DFA points and the backprop blocks, in the engine's order
    output: str
    parameters: dict[str, nn.Parameter] = field(repr=False, default_factory=dict)
    first_block_embeddings: bool = False

    def untrained(self) -> list[str]:
        """The trainable parameters that get no gradient under this layout."""
        return [name for name, source in self.source.items() if source in UNTRAINED]


def parameter_coverage(
    model: nn.Module,
    points: Sequence[str],
    backprop_blocks: Sequence[str],
    output: str,
    first_block_embeddings: bool = False,
    ran: Sequence[str] | None = None,
) -> Coverage:
    """Classify every trainable parameter of ``model`` by the source of its gradient under DFA. Registration order
    stands in for execution order (as for the automatic error point) unless ``ran`` gives the modules in the order a
    forward pass called them (the points among them); a parameter owned by a module that holds points (a ViT's class
    token on the model itself) counts as used before the first point."""
    registered = module_order(model)
    called = {name: i for i, name in reversed(list(enumerate(ran or [])))}  # each module's first call
    if not all(point in called for point in points):
        called = {}
    places = [
        (order, min(order[p] for p in points), max(order[p] for p in points)) for order in (called, registered) if order
    ]
    source: dict[str, str] = {}
    owner: dict[str, str] = {}
    parameters: dict[str, nn.Parameter] = {}
    names: dict[int, str] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        module = path.rpartition(".")[0]
        order, first, last = places[0] if module in called else places[-1]
        kind = _source(module, order, points, [*backprop_blocks, output], first, last)
        if kind == "before" and first_block_embeddings:
            kind = "true"
        name = names.setdefault(id(param), path)  # a shared parameter is named (and owned) as first registered
        if name not in source or SOURCES.index(kind) < SOURCES.index(source[name]):
            source[name] = kind
        owner.setdefault(name, module)
        parameters[name] = param
    blocks = [*points, *backprop_blocks]
    return Coverage(source, owner, list(points), blocks, output, parameters, first_block_embeddings)


def _source(
    module: str, order: dict[str, int], points: Sequence[str], true_blocks: Sequence[str], first: int, last: int
) -> str:
    if within(module, points):
        return "feedback"
    if within(module, true_blocks) or order[module] > last:
        return "true"
    if order[module] < first or any(inside(point, module) for point in points):
        return "before"
    return "between"


def check_coverage(
    model: nn.Module,
    points: Sequence[str],
    backprop_blocks: Sequence[str],
    output: str,
    first_block_embeddings: bool = False,
    strict: bool = False,
) -> Coverage:
    """:func:`parameter_coverage`, and a :class:`CoverageWarning` (``strict``: a ``ValueError``) naming every
    trainable parameter that gets no gradient, with the fix."""
    coverage = parameter_coverage(model, points, backprop_blocks, output, first_block_embeddings)
    if coverage.untrained():
        message = untrained_message(model, coverage)
        if strict:
            raise ValueError(message)
        warnings.warn(message, CoverageWarning, stacklevel=3)
    return coverage


def untrained_message(model: nn.Module, coverage: Coverage) -> str:
    """Which parameters never train, by module and place, and what to write instead."""
    untrained = coverage.untrained()
    size = sum(coverage.parameters[n].numel() for n in untrained)
    total = sum(p.numel() for p in coverage.parameters.values())
    places = []
    for kind, where in (("before", f"before the first point {coverage.points[0]!r}"), ("between", "between points")):
        names = [name for name in untrained if coverage.source[name] == kind]
        if names:
            places.append(f"{where}: {_listed(_grouped(names, coverage))}")
    fixes = [f"make them feedback points (blocks={_suggested_blocks(model, coverage)!r})"]
    embeddings = [e for e in embedding_points(model) if any(inside(coverage.owner[n], e) for n in untrained)]
    if embeddings:
        fixes.append(f"make the embeddings {embeddings} points (embeddings=True)")
    if any(coverage.source[n] == "before" for n in untrained):
        fixes.append("let what runs before the first point learn from its feedback (embeddings='first_block')")
    fixes.append("or freeze them (module.requires_grad_(False)) if they are meant to stay fixed")
    return (
        f"DFA: {len(untrained)} trainable parameters ({size:,} of {total:,} values, {size / max(total, 1):.1%}) get "
        f"no gradient under these feedback points and would never train; {'; '.join(places)}. Under DFA only the "
        "points and what runs after the last point train. Fix: "
        + ", ".join(fixes)
        + ". strict=True makes this an error."
    )


def _grouped(names: Sequence[str], coverage: Coverage) -> dict[str, list[str]]:
    """Parameters by the outermost module around their owner that holds no block and not the output (the
    owner itself when it holds blocks: a class token on the model)."""
    groups: dict[str, list[str]] = {}
    taken = [*coverage.blocks, coverage.output]
    for name in names:
        owner = coverage.owner[name]
        parts = owner.split(".") if owner else []
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        free = [p for p in prefixes if not any(inside(t, p) for t in taken)]
        groups.setdefault(free[0] if free else owner, []).append(name)
    return groups


def _listed(groups: dict[str, list[str]], most: int = 3) -> str:
    def one(module: str, names: list[str]) -> str:
        shown = ", ".join(names[:most]) + (f", ... {len(names)} in all" if len(names) > most else "")
        return f"{module or '<the model itself>'} ({shown})"

    return ", ".join(one(module, names) for module, names in groups.items())


def _suggested_blocks(model: nn.Module, coverage: Coverage) -> list[str]:
    """The blocks with the modules that hold untrained parameters (:func:`_grouped`; those holding blocks excepted)."""
    order = module_order(model)
    groups = _grouped(coverage.untrained(), coverage)
    extra = [m for m in groups if m and not any(inside(b, m) for b in coverage.blocks)]
    return sorted({*coverage.blocks, *extra}, key=order.__getitem__)


class _StrayWatch:
    """Collects the parameters without feedback that get a gradient in one backward pass, and reports them once at
    its end."""

    def __init__(self, coverage: Coverage) -> None:
        self.coverage = coverage
        self.found: list[str] = []
        self.told = False

    def hook(self, name: str):
        def on_gradient(param: Tensor) -> None:
            if self.told:
                return
            if not self.found:
                _compat.queue_backward_callback(self.report)
            self.found.append(name)

        return on_gradient

    def report(self) -> None:
        found, self.found = self.found, []
        if not found:
            return
        self.told = True
        message = (
            f"DFA: {len(found)} parameters without feedback got a gradient: {_listed(_grouped(found, self.coverage))}. "
            "The loss reaches them around the feedback points (an input of a point that also feeds a later module, "
            "e.g. DenseNet's concatenation of earlier features, or a tensor from before the first point used after "
            "the last), so they train with part of a backpropagated gradient, which DFA never gives. Choose points "
            f"that cut every path from the loss: the modules that hold them (here {_enclosing(self.coverage.points)}) "
            "or blocks='auto'; or, if such a module runs after the last point, name the output after it."
        )
        warnings.warn(message, CoverageWarning, stacklevel=2)


def watch_stray_gradients(coverage: Coverage | None) -> list[RemovableHandle]:
    """Hooks that report, once, the parameters without feedback under the layout that get a gradient all the same:
    the loss reaches them around the points, so they would train with part of a true gradient; or their module runs
    after the last point although registered before it. (``strict=True`` refuses such a layout at attach.)"""
    if coverage is None:
        return []
    watch = _StrayWatch(coverage)
    return [
        coverage.parameters[name].register_post_accumulate_grad_hook(watch.hook(name)) for name in coverage.untrained()
    ]


class _CallOrder:
    """Records, in the first forward pass, the order in which the points and the modules outside them that own
    trainable parameters are called; at the output point it classifies the parameters again by that order and reports
    those that registration order placed after the last point but that run before it (BART's decoder
    ``layernorm_embedding``, registered after the decoder's layers): they would never train either."""

    def __init__(self, model: nn.Module, coverage: Coverage, strict: bool) -> None:
        self.model, self.coverage, self.strict = model, coverage, strict
        self.ran: list[str] = []
        self.handles: list[RemovableHandle] = []
        routed = [*coverage.blocks, coverage.output]
        owners = {coverage.owner[name] for name in coverage.source}
        for name, module in model.named_modules():
            if name in coverage.blocks or name in owners and not within(name, routed):
                self.handles.append(module.register_forward_pre_hook(EngineHook(self.called(name))))
        output = model.get_submodule(coverage.output)
        self.handles.append(output.register_forward_hook(EngineHook(self.finish)))

    def called(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled():  # a forward pass that trains (an evaluation may take another path)
                self.ran.append(name)

        return hook

    def finish(self, module: nn.Module, args: tuple, output: object) -> None:
        if not torch.is_grad_enabled() or not self.ran:
            return
        for handle in self.handles:  # once: torch copies a module's hooks before calling them, so this is safe
            handle.remove()
        c = self.coverage
        by_call = parameter_coverage(
            self.model, c.points, c.blocks[len(c.points) :], c.output, c.first_block_embeddings, self.ran
        )
        late = [n for n in by_call.untrained() if c.source.get(n) not in UNTRAINED]
        if not late:
            return
        c.source.update({name: by_call.source[name] for name in late})
        message = (
            f"DFA: {len(late)} trainable parameters are registered after the last feedback point but run before "
            f"one, so they get no gradient and would never train: {_listed(_grouped(late, c))}. Fix: make them "
            f"feedback points (blocks={_suggested_blocks(self.model, c)!r}), or freeze them "
            "(module.requires_grad_(False)) if they are meant to stay fixed."
        )
        if self.strict:
            raise RuntimeError(message + " (strict=True)")
        warnings.warn(message, CoverageWarning, stacklevel=2)


def check_call_order(model: nn.Module, coverage: Coverage | None, strict: bool = False) -> list[RemovableHandle]:
    """Hooks that check, at the first training forward pass, the coverage by the order the modules run in (the
    report, or with ``strict`` an error, names what registration order misplaced); they remove themselves then."""
    if coverage is None:
        return []
    return _CallOrder(model, coverage, strict).handles


def _enclosing(points: Sequence[str]) -> list[str]:
    """The modules that hold the points: one level up from them."""
    return sorted({point.rpartition(".")[0] for point in points if "." in point}) or list(points)
