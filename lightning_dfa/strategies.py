"""``DFAStrategy`` and its DDP and FSDP siblings: thin Lightning strategies that train with a ``DFA`` callback.

Where the feedback points come from, in order: the strategy's own arguments; else the
LightningModule's ``configure_dfa()`` hook (a ``DFA`` or a dict of its arguments), with any
argument given to the strategy overriding it; else ``blocks="auto"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, StrategyRegistry
from torch import nn

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


class DFAFSDPStrategy(_DFAStrategyMixin, FSDPStrategy):
    """Fully sharded data parallel training with DFA: ``Trainer(strategy="dfa_fsdp", devices=8)``.

    Lightning's ``FSDPStrategy`` shards parameters, gradients and optimizer state; the ``DFA`` callback
    attaches after the model is wrapped, so feedback points are named as in the unwrapped module (wrap
    whole blocks, e.g. ``auto_wrap_policy={GPT2Block}``, so each point is one FSDP unit). Every rank
    builds the identical projection from the same seed (nothing is broadcast); the block gradients
    are then reduce-scattered like any other gradient.

    Example::

        trainer = Trainer(strategy="dfa_fsdp", accelerator="gpu", devices=8)   # blocks from configure_dfa()
        trainer = Trainer(
            strategy=DFAFSDPStrategy(blocks="model.transformer.h.*", auto_wrap_policy={GPT2Block}),
            accelerator="gpu",
            devices=8,
            num_nodes=2,
        )
    """

    strategy_name = "dfa_fsdp"

    def __init__(
        self,
        blocks: str | Sequence[str] | None = None,
        output: str | None = None,
        projector: str | dict[str, Any] | None = None,
        seed: int | None = None,
        mode: str | None = None,
        dfa_kwargs: dict[str, Any] | None = None,
        **fsdp_kwargs: Any,
    ) -> None:
        super().__init__(**fsdp_kwargs)
        self._store_dfa_args(
            blocks=blocks, output=output, projector=projector, seed=seed, mode=mode, dfa_kwargs=dfa_kwargs or {}
        )

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """Wrap on CPU too: torch's FSDP needs ``device_id=cpu`` there, and Lightning passes the index (None)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = any(isinstance(module, FullyShardedDataParallel) for module in model.modules())
        if self.root_device.type == "cpu" and not wrapped:
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning would warn it is ignored
        return super()._setup_model(model)


def register_strategies() -> None:
    """Register "dfa", "dfa_ddp", "dfa_ddp_spawn" and "dfa_fsdp" (Lightning no longer discovers plugins)."""
    StrategyRegistry.register("dfa", DFAStrategy, description="Direct Feedback Alignment, one device", override=True)
    for name, start_method in (("dfa_ddp", "popen"), ("dfa_ddp_spawn", "spawn")):
        StrategyRegistry.register(
            name,
            DFADDPStrategy,
            description=f"Direct Feedback Alignment with DDP ({start_method})",
            start_method=start_method,
            override=True,
        )
    StrategyRegistry.register(
        "dfa_fsdp", DFAFSDPStrategy, description="Direct Feedback Alignment with FSDP", override=True
    )
