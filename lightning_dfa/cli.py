"""``lightning-dfa``: LightningCLI over the library's models and data, plus ``lightning-dfa recipes``.

Examples::

    lightning-dfa fit --config recipes/digits-mlp.yaml                 # DFA
    lightning-dfa fit --config digits-mlp --trainer.strategy.mode=backprop   # the backprop baseline
    lightning-dfa recipes                                              # list shipped recipes
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from argparse import ArgumentError
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import get_loader, set_loader
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_dfa.callbacks.history import plot_history, write_or_warn
from lightning_dfa.feedback import MODES, FeedbackEngine
from lightning_dfa.loggers import guard_loggers
from lightning_dfa.projectors.registry import PROJECTORS
from lightning_dfa.summary import RunResult, summary_table

RECIPES = resources.files("lightning_dfa") / "recipes"

#: The engine's settings (``error_rows``, ``feedback_scale``, ...): in a strategy's YAML they go in ``dfa_kwargs``.
DFA_SETTINGS = tuple(FeedbackEngine().settings())


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
    """LightningCLI that, after ``fit``, tests the model, runs the requested baselines and prints a summary.

    ``--baselines=[frozen,backprop]`` reruns the same config in those modes (same seed, data and steps)
    and prints them beside the DFA run; with ``History`` callbacks their curves share one plot.
    """

    def __init__(self, *args: Any, cli_args: list[str] | None = None, summary: bool = True, **kwargs: Any) -> None:
        self.cli_args, self.print_summary = list(cli_args or []), summary
        self.result: RunResult | None = None
        super().__init__(*args, args=cli_args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--baselines",
            type=list[str],
            default=[],
            help="modes to rerun after fit for comparison: frozen (frozen-blocks control), backprop",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does; an unknown option's error also names the closest valid ones."""
        subcommand = next((a for a in args or [] if isinstance(a, str) and not a.startswith("-")), None)
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            sub_parser = getattr(self, "_subcommand_parsers", {}).get(subcommand, parser)
            hint = option_hint(str(err), sub_parser)
            command = f"lightning-dfa {subcommand} --help" if subcommand else "lightning-dfa --help"
            sys.stderr.write(f"error: {err}\n{hint}Every option: {command}\n")
            raise SystemExit(2) from None
        finally:
            for each in parsers:
                each.exit_on_error = True

    def before_fit(self) -> None:
        _check_baselines(self.config.fit.baselines, self.trainer)
        # Start W&B (or any logger) now: one that cannot start is replaced by a CSVLogger before training.
        # Spawned processes get a pickled trainer: there the DFA callback guards the loggers in each process.
        if not _spawns(self.trainer):
            guard_loggers(self.trainer, start=True)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._fit_started = time.perf_counter()

    def after_fit(self) -> None:
        seconds = time.perf_counter() - self._fit_started
        metrics = dict(self.trainer.callback_metrics)
        if is_overridden("test_step", self.model) and is_overridden("test_dataloader", self.datamodule):
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics.update(results[0] if results else {})
        self.result = RunResult.of(self.trainer, seconds, metrics)
        _finish_wandb(self.trainer)
        runs = [self.result] + [self._baseline(mode) for mode in self.config.fit.baselines]
        # trainer.log_dir is a collective (a broadcast from rank 0): every rank asks, rank 0 writes.
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.print_summary and self.trainer.is_global_zero:
            references = getattr(self.datamodule, "reference_metrics", dict)()
            print(summary_table(runs, references))
            self._save(runs, references, run_dir)
            self._plot(runs)

    def _save(self, runs: list[RunResult], references: dict[str, float], run_dir: Path) -> None:
        summary = {"runs": [run.as_dict() for run in runs], "references": references}

        def write(path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=1))

        write_or_warn(run_dir / "summary.json", write, "the summary")

    def _baseline(self, mode: str) -> RunResult:
        args = [*self.cli_args, f"--trainer.strategy.mode={mode}", "--baselines=[]"]
        wandb_name = next(
            (lg._wandb_init.get("name") for lg in self.trainer.loggers if isinstance(lg, WandbLogger)), None
        )
        if wandb_name:
            args.append(f"--trainer.logger.init_args.name={wandb_name}-{mode}")
        return DFACLI(cli_args=args, summary=False, **_CLI_OPTIONS).result

    def _plot(self, runs: list[RunResult]) -> None:
        histories = {run.mode: run.history for run in runs if run.history is not None and run.history.run_dir}
        if len(histories) > 1:
            path = self.result.history.path("comparison.png")
            if write_or_warn(path, lambda p: plot_history(histories, p), "the comparison plot"):
                print(f"curves: {path}")


def _finish_wandb(trainer: Any) -> None:
    """Close this run's W&B run, so that a baseline (or the next run in this process) gets its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            try:
                logger.experiment.finish()
            except Exception as err:  # noqa: BLE001 - the run is over; its results are already saved
                warnings.warn(
                    f"Could not close the W&B run: {type(err).__name__}: {err}.", RuntimeWarning, stacklevel=2
                )


def _spawns(trainer: Any) -> bool:
    """Whether fit starts its processes by spawning (a W&B run started before would be pickled to them)."""
    return getattr(getattr(trainer.strategy, "launcher", None), "_start_method", None) in ("spawn", "forkserver")


def option_hint(message: str, parser: Any) -> str:
    """For a parser error about an unknown option, a line naming the closest valid options (else "").

    Example::

        option_hint("Group 'trainer' does not accept option 'max_stepz'", parser)
        # "hint: 'max_stepz' is not an option of trainer; did you mean 'max_steps'? Its options: [...]"
    """
    found = re.search(r"class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted", message)
    if found:
        where, key = found[1], found[2]
        options = _init_options(where)
    elif found := re.search(r"(?:Group '([\w.]+)' )?does not accept option '([\w.]+)'", message):
        where, key = _split_key(f"{found[1]}.{found[2]}" if found[1] else found[2], _dests(parser))
        options = _children(where, _dests(parser))
        where = where or "the config"
    elif found := re.search(r"Option '([\w.]+)' is not accepted", message):
        where, key = _split_key(found[1], _dests(parser))
        options = _children(where, _dests(parser))
        where = where or "the config"
    else:
        return ""
    if "dfa_kwargs" in options and key in DFA_SETTINGS:  # a DFA setting the strategy does not name
        return (
            f"hint: {key!r} is a DFA setting that {where} does not name: give it under dfa_kwargs, e.g. "
            f"init_args: {{dfa_kwargs: {{{key}: ...}}}}, or return it from the model's configure_dfa().\n"
        )
    close = difflib.get_close_matches(key, options, n=3)
    guess = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    listed = f" Its options: {options}." if options and len(options) <= 40 else ""
    return f"hint: {key!r} is not an option of {where}{guess}{listed}\n"


def _load_yaml(text: str) -> Any:
    """YAML as jsonargparse loads it, with projector names as dotted paths (``class_path: seeded`` ->
    ``lightning_dfa.projectors.seeded.SeededGaussian``): jsonargparse imports every ``class_path`` inside a class's
    arguments, and can only import dotted paths (a name without a dot is never an import path, so this is safe)."""
    return _dotted_projectors(_YAML(text))


def _dotted_projectors(value: Any) -> Any:
    if isinstance(value, list):
        return [_dotted_projectors(item) for item in value]
    if not isinstance(value, dict):
        return value
    value = {key: _dotted_projectors(item) for key, item in value.items()}
    factory = PROJECTORS.get(value.get("class_path")) if isinstance(value.get("class_path"), str) else None
    if inspect.isclass(factory):
        value["class_path"] = f"{factory.__module__}.{factory.__qualname__}"
    return value


def _split_key(path: str, dests: list[str]) -> tuple[str, str]:
    """``("trainer", "max_stepz")`` for ``"trainer.max_stepz"``: the deepest known group, and the unknown key in it."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        group = ".".join(parts[:depth])
        if any(d.startswith(group + ".") for d in dests):
            return group, parts[depth]
    return "", parts[0]


def _children(group: str, dests: list[str]) -> list[str]:
    prefix = group + "." if group else ""
    skip = {"help", "config", "print_config"}
    return sorted({d[len(prefix) :].split(".")[0] for d in dests if d.startswith(prefix)} - skip)


def _dests(parser: Any) -> list[str]:
    return [action.dest for action in getattr(parser, "_actions", []) if isinstance(action.dest, str)]


def _init_options(class_path: str) -> list[str]:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.name != "self" and p.kind not in variadic]


def _check_baselines(baselines: list[str], trainer: Any) -> None:
    unknown = [mode for mode in baselines if mode not in MODES]
    if unknown:
        raise ValueError(f"--baselines: unknown modes {unknown}; choose from {list(MODES)}.")
    if baselines and not hasattr(trainer.strategy, "dfa"):
        raise ValueError(
            "--baselines reruns the config with --trainer.strategy.mode=<mode>: the trainer's strategy must be "
            "a lightning_dfa.DFAStrategy (or DFADDPStrategy) given as class_path + init_args."
        )


_YAML = get_loader("yaml")
set_loader("lightning_dfa", _load_yaml, exceptions=(yaml.YAMLError,))

_CLI_OPTIONS: dict[str, Any] = dict(
    parser_kwargs={"parser_mode": "lightning_dfa"},
    subclass_mode_model=True,
    subclass_mode_data=True,
    save_config_kwargs={"overwrite": True},
    seed_everything_default=0,
)


def main(args: list[str] | None = None) -> None:
    """The ``lightning-dfa`` console script."""
    run(args)


def run(args: list[str] | None = None) -> DFACLI | None:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``) and return it, e.g. to read ``cli.trainer``."""
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
    return DFACLI(cli_args=args, **_CLI_OPTIONS)


if __name__ == "__main__":
    main()
