"""``lightning-dfa``: LightningCLI over the library's models and data, plus ``lightning-dfa recipes``.

Examples::

    lightning-dfa fit --config recipes/digits-mlp.yaml                 # DFA
    lightning-dfa fit --config digits-mlp --trainer.strategy.mode=backprop   # the backprop baseline
    lightning-dfa recipes                                              # list shipped recipes
"""

from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden

RECIPES = resources.files("lightning_dfa") / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in RECIPES.iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(value: str) -> str:
    """A config path as given, or the shipped recipe of that name (``digits-mlp`` or ``digits-mlp.yaml``)."""
    if Path(value).exists():
        return value
    name = Path(value).name.removesuffix(".yaml")
    if name in recipe_names():
        return str(RECIPES / f"{name}.yaml")
    raise SystemExit(f"Config {value!r} is neither a file nor a shipped recipe; recipes: {recipe_names()}.")


def default_wandb_mode() -> None:
    """W&B runs offline unless the user is logged in (API key or netrc entry), so nothing hangs offline."""
    if "WANDB_MODE" in os.environ:
        return
    netrc = Path.home() / ".netrc"
    logged_in = "WANDB_API_KEY" in os.environ or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"


class DFACLI(LightningCLI):
    """LightningCLI that tests the fitted model and prints a summary after ``fit``."""

    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        trainer, elapsed = self.trainer, time.perf_counter() - self._fit_started
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        test_metrics: dict[str, float] = {}
        if is_overridden("test_step", self.model) and is_overridden("test_dataloader", self.datamodule):
            results = trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
        if trainer.is_global_zero:
            print(summary_table(trainer, fit_metrics | test_metrics, elapsed))


def summary_table(trainer, metrics: dict[str, float], elapsed: float) -> str:
    dfa = getattr(trainer.strategy, "dfa", None) or next(
        (c for c in trainer.callbacks if type(c).__name__ == "DFA"), None
    )
    mode = dfa.mode if dfa is not None else "backprop (no DFA)"
    rows = [("mode", mode), ("steps", str(trainer.global_step)), ("fit time", f"{elapsed:.1f} s")]
    if trainer.global_step:
        rows.append(("time per step", f"{1000 * elapsed / trainer.global_step:.1f} ms"))
    rows += [(k, f"{v:.4f}") for k, v in sorted(metrics.items()) if not k.endswith("_step")]
    width = max(len(k) for k, _ in rows)
    lines = ["", "lightning-dfa summary", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> DFACLI | None:
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["recipes"]:
        for name in recipe_names():
            first = (RECIPES / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:<20} {first}")
        return None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            args[i + 1] = resolve_recipe(args[i + 1])
        elif arg.startswith("--config="):
            args[i] = "--config=" + resolve_recipe(arg.split("=", 1)[1])
    default_wandb_mode()
    import lightning_dfa  # noqa: F401  (registers the strategies before the Trainer is parsed)

    return DFACLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main()
