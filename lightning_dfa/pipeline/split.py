"""Cut a model into pipeline stages at block boundaries; each stage keeps its modules under their original paths.

Example::

    stage = split_model(model, num_stages=4, stage_index=rank)     # blocks found as blocks="auto" finds them
    stage.state_dict().keys()                                      # 'transformer.h.3.attn.c_attn.weight', ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dfa.feedback.config import DFAConfig
from lightning_dfa.feedback.outputs import first_tensor
from lightning_dfa.feedback.points import auto_output, resolve_module, resolve_points
from lightning_dfa.pipeline.chain import Chain, chain_of


class StageModule(nn.Module):
    """One pipeline stage: some blocks of a model (with the embeddings on the first stage and the head on the
    last), registered under their original paths, so ``state_dict()`` keys are the unsplit model's.

    In a training forward each block's input is cut from the graph and its output recorded (``take_records``): the
    schedule gives each recorded output its feedback, and no gradient ever needs to leave the stage.
    """

    def __init__(
        self, model: nn.Module, chain: Chain, blocks: Sequence[str], index: int, num_stages: int, output: str
    ) -> None:
        super().__init__()
        self.chain, self.stage_index, self.num_stages = chain, index, num_stages
        self.points = list(blocks)
        self.output = output
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        before, after = chain.before if self.is_first else (), chain.after if self.is_last else ()
        own = [path for block in blocks for path in (block, *chain.trailing.get(block, ()))]
        paths = [*chain.shared, *before, *own, *after]
        for path in paths:
            _attach(self, path, model.get_submodule(path))
        self._records: list[tuple[str, Tensor]] = []
        self._output_value: Tensor | None = None

    def forward(self, *inputs: Any) -> Any:
        hidden = self.chain.embed(self, *inputs) if self.is_first else inputs[0]
        training = torch.is_grad_enabled()
        context = self.chain.context(self, hidden) if self.points else {}
        for name in self.points:
            # Cut here: the block's backward stops at its input (DFA: its feedback arrives from the error).
            output = self.chain.block(self.get_submodule(name), hidden.detach(), **context)
            hidden = first_tensor(output, f"Feedback point {name!r}")
            if training:
                self._records.append((name, hidden))
            hidden = hidden.detach()
            for path in self.chain.trailing.get(name, ()):
                hidden = self.get_submodule(path)(hidden)
        if not self.is_last:
            return hidden
        # Hooked only while the head runs: the module is the user's own, shared with the unsplit model.
        handle = self.get_submodule(self.output).register_forward_hook(self._keep_output)
        try:
            return self.chain.head(self, hidden)
        finally:
            handle.remove()

    def _keep_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        value = first_tensor(output, f"Output point {self.output!r}")
        if torch.is_grad_enabled() and value.requires_grad:
            value.retain_grad()  # its gradient in the head's backward is the error e
            self._output_value = value

    def take_records(self) -> list[tuple[str, Tensor]]:
        """The block outputs recorded by the last training forward (graphs attached), and forget them."""
        records, self._records = self._records, []
        return records

    def take_output(self) -> Tensor | None:
        """The last stage: the output point's output of the last training forward (its ``.grad`` is ``e``)."""
        value, self._output_value = self._output_value, None
        return value


def split_model(
    model: nn.Module,
    num_stages: int,
    stage_index: int,
    config: DFAConfig | None = None,
    *,
    blocks_per_stage: Sequence[int] | None = None,
    chain: Chain | None = None,
) -> StageModule:
    """Stage ``stage_index`` of ``model`` cut into ``num_stages`` stages between its blocks.

    The blocks are ``config.blocks`` (``"auto"``: as the feedback engine finds them), shared out contiguously,
    the earlier stages taking one more when they do not divide evenly (the last stage also holds the head), or
    ``blocks_per_stage``. The stage holds the model's own modules (no copy): build the model on each rank.
    """
    config = DFAConfig.of(config)
    check_pipeline_config(config)
    if not isinstance(num_stages, int) or num_stages < 1 or not 0 <= stage_index < num_stages:
        raise ValueError(f"Need 0 <= stage_index < num_stages with num_stages >= 1, got {stage_index}, {num_stages}.")
    blocks = list(chain.blocks) if chain is not None else resolve_points(model, config.blocks)
    chain = chain if chain is not None else chain_of(model, blocks)
    output = config.output if config.output is not None else auto_output(model, blocks)
    if output is None:
        raise ValueError(
            f"No error point found in {type(model).__name__}: name the module whose output the loss reads "
            f"(config.output), among the modules after the blocks: {list(chain.after)}."
        )
    resolve_module(model, output, role="output")
    if not any(output == path or output.startswith(path + ".") for path in chain.after):
        raise ValueError(
            f"The output point {output!r} must be one of the modules after the last block, on the last stage: "
            f"{list(chain.after)}."
        )
    counts = _counts(len(blocks), num_stages, blocks_per_stage)
    start = sum(counts[:stage_index])
    _check_ties(model, chain, counts)
    return StageModule(model, chain, blocks[start : start + counts[stage_index]], stage_index, num_stages, output)


def check_pipeline_config(config: DFAConfig) -> None:
    """The settings the pipeline supports: DFA on every block, per-row (or per-token) errors."""
    unsupported = {
        "mode": (config.mode, "dfa", "torch's own ScheduleGPipe / Schedule1F1B are the backprop pipeline"),
        "backprop_top": (config.backprop_top, 0, "a backprop block would need the gradient from the stage above"),
        "embeddings": (config.embeddings, False, "the embeddings train only through tied weights here"),
        "spatial_feedback": (config.spatial_feedback, False, "per-pixel feedback is not split into stages yet"),
    }
    for name, (value, supported, why) in unsupported.items():
        if value != supported:
            raise ValueError(f"The DFA pipeline needs {name}={supported!r}, got {value!r}: {why}.")


def _counts(blocks: int, stages: int, given: Sequence[int] | None) -> list[int]:
    if given is not None:
        given = list(given)
        if len(given) != stages or sum(given) != blocks or min(given) < 1:
            raise ValueError(
                f"blocks_per_stage={given} must give each of the {stages} stages at least one block and "
                f"{blocks} blocks in all."
            )
        return given
    if stages > blocks:
        raise ValueError(f"{stages} stages need at least {stages} blocks; the model has {blocks}.")
    base, extra = divmod(blocks, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def _check_ties(model: nn.Module, chain: Chain, counts: list[int]) -> None:
    """A parameter shared by modules on two stages (a tied head) would train two copies apart: refuse it."""
    stage_of: dict[str, int] = {}
    blocks, start = list(chain.blocks), 0
    for index, count in enumerate(counts):
        for name in blocks[start : start + count]:
            stage_of[name] = index
            for path in chain.trailing.get(name, ()):
                stage_of[path] = index
        start += count
    for path in chain.before:
        stage_of[path] = 0
    for path in chain.after:
        stage_of[path] = len(counts) - 1
    owners: dict[int, tuple[str, int]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        stage = next((s for path, s in stage_of.items() if name.startswith(path + ".")), None)
        if stage is None:
            continue
        seen = owners.setdefault(id(param), (name, stage))
        if seen[1] != stage:
            raise ValueError(
                f"The parameter {seen[0]!r} (stage {seen[1]}) is tied to {name!r} (stage {stage}): the stages would "
                "train two copies apart. Untie it (HF: config tie_word_embeddings=False) or use one stage."
            )


def _attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at ``path`` below ``root``, creating plain containers on the way."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = dict(node.named_children()).get(part)
        if child is None:
            child = nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(leaf, module)
