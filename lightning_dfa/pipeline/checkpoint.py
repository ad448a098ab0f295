"""Per-stage checkpoints under the unsplit model's names: each stage saves its own, and together they load into
the unsplit model, its optimizer and a one-process ``FeedbackEngine``.

Example::

    torch.save(stage_state_dict(schedule, optimizer), f"ckpt/stage-{rank}.pt")       # on every stage
    load_stage_state_dict(schedule, optimizer, torch.load(f"ckpt/stage-{rank}.pt"))  # resume, same stages
    whole = unsplit_state_dict([torch.load(f"ckpt/stage-{i}.pt") for i in range(P)])  # one process
    model.load_state_dict(whole["model"]); load_named_optimizer_state(optimizer, model, whole["optimizer"])
    engine.load_state_dict(whole["feedback"])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_dfa.pipeline.schedule import DFASchedule


def stage_state_dict(schedule: DFASchedule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This stage's parameters, optimizer state and feedback state, keyed by the unsplit model's names."""
    module = schedule.module
    return {
        "stage": {"index": module.stage_index, "num_stages": module.num_stages, "points": list(module.points)},
        "model": module.state_dict(),
        "optimizer": named_optimizer_state(optimizer, module),
        "feedback": schedule.feedback.state_dict(),
        "skipped_in_a_row": schedule.skipped_in_a_row,
        "rng": torch.get_rng_state(),
    }


def load_stage_state_dict(schedule: DFASchedule, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Resume this stage from :func:`stage_state_dict` (the same stage of the same split)."""
    module = schedule.module
    saved = state["stage"]
    here = {"index": module.stage_index, "num_stages": module.num_stages, "points": list(module.points)}
    if saved != here:
        raise ValueError(f"This checkpoint is of stage {saved}, this stage is {here}: load each stage's own file.")
    module.load_state_dict(state["model"])
    load_named_optimizer_state(optimizer, module, state["optimizer"])
    schedule.feedback.load_state_dict(state["feedback"])
    schedule.skipped_in_a_row = state["skipped_in_a_row"]
    torch.set_rng_state(state["rng"])


def named_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named as in ``module`` instead of numbered."""
    names = {id(p): n for n, p in module.named_parameters()}
    order = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise ValueError(f"The optimizer trains {len(missing)} parameters that are not the module's.")
    saved = optimizer.state_dict()
    by_index = {index: names[id(p)] for index, p in enumerate(order)}
    return {
        "state": {by_index[index]: value for index, value in saved["state"].items()},
        "param_groups": [{**g, "params": [by_index[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module, named: dict[str, Any]) -> None:
    """Load :func:`named_optimizer_state` (one stage's, or :func:`unsplit_state_dict`'s) into ``optimizer``."""
    names = {id(p): n for n, p in module.named_parameters()}
    groups_of = {name: group for group in named["param_groups"] for name in group["params"]}
    current = optimizer.state_dict()
    index, state, groups = 0, {}, []
    for group, own in zip(optimizer.param_groups, current["param_groups"]):
        params = [names[id(p)] for p in group["params"]]
        unknown = [n for n in params if n not in groups_of]
        if unknown:
            raise ValueError(f"The checkpoint's optimizer has no state for {unknown[:5]}: is it of this model?")
        settings = {k: v for k, v in groups_of[params[0]].items() if k != "params"}
        groups.append({**settings, "params": own["params"]})
        for name in params:
            if name in named["state"]:
                state[index] = named["state"][name]
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def unsplit_state_dict(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The stages' checkpoints as one: the unsplit model's ``state_dict``, named optimizer state, feedback state."""
    stages = sorted(stages, key=lambda s: s["stage"]["index"])
    indices = [s["stage"]["index"] for s in stages]
    count = stages[0]["stage"]["num_stages"]
    if indices != list(range(count)):
        raise ValueError(f"Need the checkpoint of every stage 0..{count - 1}, got stages {indices}.")
    model: dict[str, Any] = {}
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for stage in stages:
        model.update(stage["model"])
        state.update(stage["optimizer"]["state"])
        groups += stage["optimizer"]["param_groups"]
    feedback = stages[-1]["feedback"]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "feedback": feedback}
