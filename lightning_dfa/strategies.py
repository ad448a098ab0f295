"""``DFAStrategy`` and its DDP and FSDP siblings: thin Lightning strategies that train with a ``DFA`` callback.

Each takes the DFA settings as keywords (the rest go to the Lightning strategy it extends) and hands them to its
``DFA`` callback, which merges them with the module's ``configure_dfa()`` and keeps the run's state.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch import nn

from lightning_dfa import _compat, _lightning_compat
from lightning_dfa._checks import closest
from lightning_dfa.callback import DFA
from lightning_dfa.feedback import DFAConfig
from lightning_dfa.feedback.points import resolve_points


class _DFAStrategyMixin:
    """Shared machinery: take the DFA settings out of the keyword arguments (``None``: not given here) and run
    a ``DFA`` callback with them as the first callback."""

    dfa: DFA | None

    def __init__(
        self,
        *,
        blocks: str | Sequence[str] | None = None,
        output: str | None = None,
        projector: Any = None,
        seed: int | None = None,
        mode: str | None = None,
        error_rows: int | None = None,
        head_lr_scale: float | None = None,
        lr_scale: float | str | None = None,
        lr_scale_ramp: int | None = None,
        backprop_top: int | None = None,
        embeddings: bool | str | None = None,
        spatial_feedback: bool | None = None,
        spatial_patch: int | None = None,
        nonfinite: str | None = None,
        nonfinite_patience: int | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> None:
        given = {name: value for name, value in locals().items() if name in DFAConfig.names() and value is not None}
        _check_typos(type(self), kwargs)
        DFAConfig(**given)  # a bad value fails here, not when fit starts
        super().__init__(**kwargs)
        self._dfa_settings = given
        self.dfa = None

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        if self.dfa is None:
            self.dfa = DFA(**self._dfa_settings)
        callbacks = model.trainer.callbacks
        others = [c for c in callbacks if isinstance(c, DFA) and c is not self.dfa]
        if others:
            raise ValueError(
                f"Trainer(strategy={self.strategy_name!r}) already applies DFA; remove the DFA callback from "
                "callbacks=[...] (or use another strategy with the callback)."
            )
        if self.dfa not in callbacks:
            callbacks.insert(0, self.dfa)


def _check_typos(strategy: type, rest: dict[str, Any]) -> None:
    """Raise for an argument that is neither the Lightning strategy's nor a DFA setting, but close to one."""
    parents = [c for c in strategy.__mro__ if c.__module__.startswith("lightning.")]
    named = set(inspect.signature(parents[0].__init__).parameters)
    for key in rest.keys() - named:
        close = closest(key, DFAConfig.names(), cutoff=0.8)
        if close:
            raise TypeError(f"{strategy.__name__} got {key!r}, which is not a DFA setting: did you mean {close[0]!r}?")


class DFAStrategy(_DFAStrategyMixin, SingleDeviceStrategy):
    """Single-device training with DFA: ``Trainer(strategy="dfa", accelerator="cuda")``, or
    ``Trainer(strategy=DFAStrategy(blocks="blocks.*", output="head"))``.
    """

    strategy_name = "dfa"

    def __init__(self, device: str | torch.device | None = None, **kwargs: Any) -> None:
        super().__init__(device=device or "cpu", **kwargs)
        self._device_given = device is not None
        # Filled by the Trainer from accelerator/devices, so "dfa" follows accelerator="cuda".
        self.parallel_devices: list[torch.device] | None = None

    @property
    def root_device(self) -> torch.device:
        if self._device_given or not self.parallel_devices:
            return self._root_device
        if len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='dfa' runs on one device, but devices={len(self.parallel_devices)} were requested: "
                "use strategy='dfa_ddp' (or 'dfa_ddp_spawn') for several devices."
            )
        return self.parallel_devices[0]


class DFADDPStrategy(_DFAStrategyMixin, DDPStrategy):
    """Distributed data parallel training with DFA: ``Trainer(strategy="dfa_ddp", devices=8)``. Every rank builds
    the identical projection from the same seed (nothing is broadcast)."""

    strategy_name = "dfa_ddp"

    def teardown(self) -> None:
        super().teardown()
        # A spawned rank ends with fit: closing gloo in its exit handler instead aborted a rank now and then.
        if torch.distributed.is_initialized() and _lightning_compat.launcher_spawns(self.lightning_module.trainer):
            torch.distributed.destroy_process_group()


class DFAFSDPStrategy(_DFAStrategyMixin, FSDPStrategy):
    """Fully sharded data parallel training with DFA: ``Trainer(strategy="dfa_fsdp", devices=8)``.

    Wrap whole blocks (``auto_wrap_policy={GPT2Block}``): each point moves out to its FSDP unit (:func:`outer_points`);
    a point inside a unit is an error. Runs on CPU (gloo) too.
    """

    strategy_name = "dfa_fsdp"

    _wrapper: nn.Module | None = None  # the FSDP wrapper of the module, made once

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap in FSDP, on CPU too, and only once: ``trainer.test()`` after ``fit`` reuses the wrapper."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._wrapper is not None and self._wrapper.module is model:
            return self._wrapper  # Lightning reconnects the bare module, whose parameters are already sharded
        wrapped = any(isinstance(module, FullyShardedDataParallel) for module in model.modules())
        if self.root_device.type == "cpu" and not wrapped:
            # torch's FSDP needs device_id=cpu for a CPU module; Lightning passes the device index (None).
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning would warn it is ignored
        model = super()._setup_model(model)
        self._wrapper = model if isinstance(model, FullyShardedDataParallel) else None
        if self.dfa is not None:
            engine = self.dfa.engine
            engine.config = engine.config.replace(blocks=outer_points(self.lightning_module, engine.config.blocks))
        return model


#: Attribute names under which torch's FSDP (1) and activation checkpointing keep the module they wrap.
WRAPPED = _compat.WRAPPED_MODULE_ATTRIBUTES


def outer_points(model: nn.Module, blocks: str | Sequence[str]) -> str | list[str]:
    """The feedback points of ``model``, each moved out to its outermost FSDP / checkpoint wrapper: FSDP (1) hooks
    the gathering of a unit's parameters for backward on the wrapper's outputs, which a point inside would detach.
    """
    points = resolve_points(model, blocks)
    outer = [_strip_wrapped(point) for point in points]
    for point in outer:
        if f".{WRAPPED[0]}." in f".{point}.":
            unit = point[: point.index(WRAPPED[0]) - 1]
            raise ValueError(
                f"Feedback point {point!r} lies inside the FSDP unit {unit!r}, whose parameters would not be "
                "gathered for its backward. Use whole units as points, or wrap the blocks themselves "
                "(auto_wrap_policy={BlockClass})."
            )
    return blocks if outer == points else list(dict.fromkeys(outer))


def _strip_wrapped(path: str) -> str:
    parts = path.split(".")
    while parts and parts[-1] in WRAPPED:
        parts.pop()
    return ".".join(parts)


def register_strategies() -> None:
    """Register "dfa", "dfa_ddp", "dfa_ddp_spawn" and "dfa_fsdp" (Lightning no longer discovers plugins)."""
    for name, strategy, options in (
        ("dfa", DFAStrategy, {}),
        ("dfa_ddp", DFADDPStrategy, {"start_method": "popen"}),
        ("dfa_ddp_spawn", DFADDPStrategy, {"start_method": "spawn"}),
        ("dfa_fsdp", DFAFSDPStrategy, {}),
    ):
        StrategyRegistry.register(
            name, strategy, description=f"Direct Feedback Alignment ({name})", override=True, **options
        )


register_strategies()
