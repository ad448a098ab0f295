"""``OpticalLedger``: what each step's feedback projection cost, and would have cost on an OPU.

Per training batch it records the rows projected (error vectors ``N``), the electronic time of the
projection and its energy (time x an assumed power, :func:`~lightning_dfa.projectors.cost.default_power_w`),
and the optical frames, time and energy of the same projection on an OPU
(:func:`~lightning_dfa.projectors.cost.optical_cost`). It logs them through the Trainer's logger and prints
a summary table at the end of ``fit``.

* With an electronic projector (``gaussian``, ``seeded``, ``structured``...), the electronic time is the
  projector's own wall time, measured with forward hooks (CUDA-synchronised); the optical side is what an
  OPU would take with ``encoding`` (2 binary frames per vector by default, as the OPU's default encoding).
* With the ``OPU`` emulator, the optical side is the emulator's own frame count (its one-off calibration frames
  included, in the first step) and settings; its wall
  time is the emulation, not an electronic projection, so the electronic side is a reference projector
  (dense ``Gaussian`` when its matrix takes at most 1 GiB, else ``SeededGaussian``) timed once at the
  first step's size and scaled by the rows.

Example::

    trainer = Trainer(strategy="dfa", callbacks=[OpticalLedger()])
    trainer.fit(model)            # logs optical/*, electronic/* per step; prints the table at the end
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_dfa.callbacks.common import find_dfa
from lightning_dfa.projectors.cost import (
    FRAME_TIME,
    OPU_POWER_W,
    default_power_w,
    electronic_cost,
    optical_cost,
)
from lightning_dfa.projectors.encoding import DEFAULT_BITS, DEFAULT_ENCODING
from lightning_dfa.projectors.opu import OPU

#: What a step's projector calls add up to before the step's ledger entry is written.
NOTHING_PENDING = {"rows": 0, "vectors": 0, "seconds": 0.0, "frames": 0}
KEYS = ("vectors", "frames", "optical_time_s", "optical_energy_j", "electronic_time_s", "electronic_energy_j")


class OpticalLedger(Callback):
    """Optical versus electronic cost of the feedback projection, per step and in total (module doc).

    Args:
        encoding, bits: input encoding assumed for an electronic projector's optical cost (the OPU's default).
        frame_time, optical_power_w: OPU frame time (s) and power (W) assumed for an electronic projector.
        electronic_power_w: power of the training device, watts (default: :func:`default_power_w`).
        verbose: print the summary table at the end of ``fit``.
    """

    def __init__(
        self,
        encoding: str | None = DEFAULT_ENCODING,
        bits: int = DEFAULT_BITS,
        frame_time: float = FRAME_TIME,
        optical_power_w: float = OPU_POWER_W,
        electronic_power_w: float | None = None,
        verbose: bool = True,
    ) -> None:
        self.encoding, self.bits, self.frame_time, self.optical_power_w = encoding, bits, frame_time, optical_power_w
        self.electronic_power_w = electronic_power_w
        self.verbose = verbose
        self.totals = dict.fromkeys(KEYS, 0.0)
        self.steps = 0
        self._engine: Any = None
        self._hooked: nn.Module | None = None
        self._handles: list = []
        self._pending = dict(NOTHING_PENDING)
        self._started = 0.0
        self._reference_s_per_vector: float | None = None

    # -- wiring ----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine = find_dfa(trainer)
        if self._engine is None:
            raise RuntimeError("OpticalLedger needs DFA: use strategy='dfa' (or a sibling) or a DFA callback.")

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        projector = getattr(self._engine, "projector", None)
        if projector is not None and projector is not self._hooked:  # built lazily at the first forward
            self._remove_hooks()
            self._handles = [
                projector.register_forward_pre_hook(self._start),
                projector.register_forward_hook(self._stop),
            ]
            self._hooked = projector

    def _sync(self, tensor: torch.Tensor) -> None:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._sync(args[0])
        self._started = time.perf_counter()

    def _stop(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._sync(output)
        self._pending["seconds"] += time.perf_counter() - self._started
        self._pending["rows"] += args[0].shape[0]
        if isinstance(module, OPU):  # it may send only some rows (sample_rows)
            self._pending["vectors"] += module.stats["vectors"]
            self._pending["frames"] += module.stats["frames"] + module.stats["calibration_frames"]
        else:
            self._pending["vectors"] += args[0].shape[0]

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], None

    # -- accounting ------------------------------------------------------------------------------
    def step_cost(
        self,
        projector: nn.Module,
        vectors: int,
        seconds: float,
        frames: int,
        device: torch.device,
        rows: int | None = None,
    ) -> dict:
        """The ledger entry of one step that projected ``vectors`` errors in ``seconds`` (``frames`` if an OPU).

        ``rows``: the error rows of the step (default ``vectors``); an OPU with ``sample_rows < 1`` sends only
        ``vectors`` of them, while the electronic reference projects them all.
        """
        rows = vectors if rows is None else rows
        power = default_power_w(device) if self.electronic_power_w is None else self.electronic_power_w
        d_e, d_fb = projector.in_features, projector.out_features
        if isinstance(projector, OPU):
            if self._reference_s_per_vector is None:
                reference = electronic_cost(rows, d_e, d_fb, device=device, repeats=3, power_w=power)
                self._reference_s_per_vector = reference.time_s / rows
            seconds = self._reference_s_per_vector * rows
            optical_s = frames * projector.frame_time
            optical_j = optical_s * projector.power_w
        else:
            cost = optical_cost(
                vectors,
                d_e,
                d_fb,
                encoding=self.encoding,
                bits=self.bits,
                frame_time=self.frame_time,
                power_w=self.optical_power_w,
            )
            frames, optical_s, optical_j = cost.frames, cost.time_s, cost.energy_j
        return {
            "vectors": vectors,
            "frames": frames,
            "optical_time_s": optical_s,
            "optical_energy_j": optical_j,
            "electronic_time_s": seconds,
            "electronic_energy_j": seconds * power,
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pending, self._pending = self._pending, dict(NOTHING_PENDING)
        if self._hooked is None or pending["rows"] == 0:
            return
        entry = self.step_cost(
            self._hooked, pending["vectors"], pending["seconds"], pending["frames"], pl_module.device, pending["rows"]
        )
        self.steps += 1
        for key in KEYS:
            self.totals[key] += entry[key]
        logged = {f"ledger/{k}": float(v) for k, v in entry.items()}
        logged.update({f"ledger/total_{k}": float(self.totals[k]) for k in KEYS if k != "vectors"})
        pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=pending["vectors"])

    def summary(self) -> dict[str, float]:
        """Totals over the run, with the optical/electronic time and energy ratios."""
        t = dict(self.totals, steps=self.steps)
        t["time_ratio_optical_over_electronic"] = (
            t["optical_time_s"] / t["electronic_time_s"] if t["electronic_time_s"] else float("nan")
        )
        t["energy_ratio_optical_over_electronic"] = (
            t["optical_energy_j"] / t["electronic_energy_j"] if t["electronic_energy_j"] else float("nan")
        )
        return t

    def table(self) -> str:
        """The summary as a small text table."""
        s = self.summary()
        per_step = max(s["steps"], 1)
        rows = [
            ("steps / error vectors", f"{s['steps']:.0f} / {s['vectors']:.0f}", ""),
            ("projection time (s)", f"{s['optical_time_s']:.4g}", f"{s['electronic_time_s']:.4g}"),
            (
                "  per step (ms)",
                f"{1e3 * s['optical_time_s'] / per_step:.4g}",
                f"{1e3 * s['electronic_time_s'] / per_step:.4g}",
            ),
            ("projection energy (J)", f"{s['optical_energy_j']:.4g}", f"{s['electronic_energy_j']:.4g}"),
            ("frames", f"{s['frames']:.0f}", ""),
        ]
        lines = [f"{'Optical cost ledger':<24}{'optical (OPU)':>16}{'electronic':>16}", "-" * 56]
        lines += [f"{name:<24}{a:>16}{b:>16}" for name, a, b in rows]
        return "\n".join(lines)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.steps == 0:
            return
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"ledger/summary_{k}": float(v) for k, v in self.summary().items()}, step=trainer.global_step
            )
        if self.verbose and trainer.is_global_zero:
            print(self.table())

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals.update(state_dict.get("totals", {}))
        self.steps = int(state_dict.get("steps", 0))
