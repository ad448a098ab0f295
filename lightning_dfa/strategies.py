"""``DFAStrategy`` and its DDP siblings: thin Lightning strategies that train with a ``DFA`` callback.

Where the feedback points come from, in order: the strategy's own arguments; else the
LightningModule's ``configure_dfa()`` hook (a ``DFA`` or a dict of its arguments), with any
argument given to the strategy overriding it; else ``blocks="auto"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

from lightning_dfa.callback import DFA, as_dfa


class _DFAStrategyMixin:
    """Shared machinery: resolve the ``DFA`` at connect time and run it as the first callback."""

    dfa: DFA | None

    def _store_dfa_args(self, **args: Any) -> None:
        extra = args.pop("dfa_kwargs")
        self._dfa_args = {k: v for k, v in {**args, **extra}.items() if v is not None}
        self.dfa = None

    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)
        if self.dfa is None:
            self.dfa = self._resolve_dfa(model)
        callbacks = model.trainer.callbacks
        others = [c for c in callbacks if isinstance(c, DFA) and c is not self.dfa]
        if others:
            raise ValueError(
                f"Trainer(strategy={self.strategy_name!r}) already applies DFA; remove the DFA callback from "
                "callbacks=[...] (or use another strategy with the callback)."
            )
        if self.dfa not in callbacks:
            callbacks.insert(0, self.dfa)

    def _resolve_dfa(self, model: pl.LightningModule) -> DFA:
        hook = getattr(model, "configure_dfa", None)
        if "blocks" in self._dfa_args or hook is None:
            return DFA(**self._dfa_args)
        configured = as_dfa(hook(), f"{type(model).__name__}.configure_dfa()")
        if not self._dfa_args:
            return configured
        return DFA(**{**configured.settings(), **self._dfa_args})


class DFAStrategy(_DFAStrategyMixin, SingleDeviceStrategy):
    """Single-device training with Direct Feedback Alignment: ``Trainer(strategy="dfa")``.

    Example::

        trainer = Trainer(strategy=DFAStrategy(blocks="blocks.*", output="head", mode="dfa"))
        trainer = Trainer(strategy="dfa", accelerator="cuda")     # blocks from configure_dfa() or "auto"
    """

    strategy_name = "dfa"

    def __init__(
        self,
        blocks: str | Sequence[str] | None = None,
        output: str | None = None,
        projector: str | dict[str, Any] | None = None,
        seed: int | None = None,
        mode: str | None = None,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        **dfa_kwargs: Any,
    ) -> None:
        super().__init__(
            device=device or "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._store_dfa_args(
            blocks=blocks, output=output, projector=projector, seed=seed, mode=mode, dfa_kwargs=dfa_kwargs
        )
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
    """Distributed data parallel training with DFA: ``Trainer(strategy="dfa_ddp", devices=8)``.

    Every rank builds the identical projection from the same seed (nothing is broadcast), so
    feedback and gradients are identical across ranks before DDP's all-reduce.
    """

    strategy_name = "dfa_ddp"

    def __init__(
        self,
        blocks: str | Sequence[str] | None = None,
        output: str | None = None,
        projector: str | dict[str, Any] | None = None,
        seed: int | None = None,
        mode: str | None = None,
        dfa_kwargs: dict[str, Any] | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(**ddp_kwargs)
        self._store_dfa_args(
            blocks=blocks, output=output, projector=projector, seed=seed, mode=mode, dfa_kwargs=dfa_kwargs or {}
        )


def register_strategies() -> None:
    """Register ``"dfa"``, ``"dfa_ddp"`` and ``"dfa_ddp_spawn"`` (Lightning no longer discovers plugins)."""
    StrategyRegistry.register("dfa", DFAStrategy, description="Direct Feedback Alignment, one device", override=True)
    for name, start_method in (("dfa_ddp", "popen"), ("dfa_ddp_spawn", "spawn")):
        StrategyRegistry.register(
            name,
            DFADDPStrategy,
            description=f"Direct Feedback Alignment with DDP ({start_method})",
            start_method=start_method,
            override=True,
        )
