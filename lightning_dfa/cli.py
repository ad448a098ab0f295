"""``lightning-dfa``: LightningCLI over the library's models and data, plus ``lightning-dfa recipes``.

Each launch writes into a new run folder (:mod:`lightning_dfa.runs`), its baselines inside it. A
configuration error prints its message alone (``LIGHTNING_DFA_DEBUG=1``: with the traceback).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pydoc
import sys
import time
import warnings
from argparse import ArgumentError
from importlib import resources
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_dfa import _lightning_compat
from lightning_dfa._checks import closest
from lightning_dfa.callbacks.history import plot_history, write_or_warn
from lightning_dfa.feedback import MODES
from lightning_dfa.loggers import guard_loggers
from lightning_dfa.projectors.registry import PROJECTORS
from lightning_dfa.runs import LATEST, new_version, run_files
from lightning_dfa.summary import RunResult, summary_table

RECIPES = resources.files("lightning_dfa") / "recipes"

#: The jsonargparse parser mode of this CLI's configs: YAML, projector names resolved (:func:`_load_yaml`).
YAML_MODE = "lightning_dfa"

#: Set (to anything) to see the traceback of a configuration error.
DEBUG_ENV = "LIGHTNING_DFA_DEBUG"

#: Errors that, raised before the model runs, come from the configuration: the command prints their message alone.
CONFIGURATION_ERRORS = (ValueError, TypeError, LookupError, ImportError, FileNotFoundError, MisconfigurationException)


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
    """LightningCLI that after ``fit`` tests the model, runs ``--baselines`` and prints and plots a summary."""

    def __init__(
        self,
        *args: Any,
        cli_args: list[str] | None = None,
        summary: bool = True,
        run_dir: Path | None = None,
        **kwargs: Any,
    ) -> None:
        self.cli_args, self.print_summary = list(cli_args or []), summary
        self.run_dir = run_dir  # None: a new version folder; a baseline is given <its DFA run's folder>/<mode>
        self.result: RunResult | None = None
        # This CLI's parsers read YAML with projector names as import paths (their own parser_mode, no other's).
        set_loader(YAML_MODE, _load_yaml, exceptions=(yaml.YAMLError,))
        defaults = kwargs.pop("trainer_defaults", {})
        callbacks = [MarkModelErrors(), EpochsOfMaxSteps()]  # fresh per run: the baselines get their own
        super().__init__(*args, args=cli_args, trainer_defaults={**defaults, "callbacks": callbacks}, **kwargs)

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
        parsers = [parser, *_lightning_compat.subcommand_parsers(self).values()]
        for each in parsers:
            each.exit_on_error = False
        try:
            # LightningCLI.parse_arguments minus its warning about args given beside sys.argv: this command
            # passes its own sys.argv on purpose (recipe names resolved), and its baselines add options to it.
            self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        except ArgumentError as err:
            sub_parser = _lightning_compat.subcommand_parsers(self).get(subcommand, parser)
            hint = option_hint(str(err), sub_parser)
            command = f"lightning-dfa {subcommand} --help" if subcommand else "lightning-dfa --help"
            # An unknown option: the hint says it in one line; jsonargparse's account of it only with DEBUG_ENV.
            detail = f"{err}\n" if hint and os.environ.get(DEBUG_ENV) else ""
            sys.stderr.write(f"error: {detail}{hint or err}\nEvery option: {command}\n")
            raise SystemExit(2) from None
        finally:
            for each in parsers:
                each.exit_on_error = True

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does, in this run's folder; the config saved with it keeps the root."""
        if not self.subcommand:
            return super().instantiate_classes()
        trainer = self.config[self.subcommand].trainer
        launched = trainer.clone()
        self._move_into_run_dir(trainer)
        try:
            super().instantiate_classes()
        finally:  # in place: SaveConfigCallback holds this config. Rerun, it makes a new version folder again.
            trainer.default_root_dir, trainer.logger = launched.default_root_dir, launched.logger

    def _move_into_run_dir(self, trainer: Namespace) -> None:
        """The trainer's root, and every logger that saves to that root, move to this run's folder."""
        root = Path(trainer.default_root_dir or "lightning_logs")
        if self.run_dir is None:
            # Only the first process creates the folder. The others (ranks started by torchrun, or launched by
            # Lightning after rank 0 chose) go through root/latest: everything they write goes through
            # trainer.log_dir, a broadcast of rank 0's folder.
            self.run_dir = new_version(root) if _first_process() else root / LATEST
        elif _first_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)  # a baseline's, in its DFA run's: W&B starts in it
        for logger in _logger_configs(trainer.logger):
            saves_to = (logger.get("init_args") or {}).get("save_dir")
            if saves_to is not None and Path(saves_to) == root:
                logger.init_args.save_dir = str(self.run_dir)
        trainer.default_root_dir = str(self.run_dir)

    def before_fit(self) -> None:
        _check_baselines(self.config.fit.baselines, self.trainer)
        # Start W&B (or any logger) now: one that cannot start is replaced by a CSVLogger before training.
        # Spawned processes get a pickled trainer: there the DFA callback guards the loggers in each process.
        if not _lightning_compat.launcher_spawns(self.trainer):
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
        if self.print_summary and self.trainer.is_global_zero:
            references = getattr(self.datamodule, "reference_metrics", dict)()
            print(summary_table(runs, references))
            self._plot(runs)
            self._save(runs, references)

    def _save(self, runs: list[RunResult], references: dict[str, float]) -> None:
        """``summary.json``, written last: it lists every file of the run folder, itself included."""
        path = Path(self.run_dir) / "summary.json"
        summary = {"runs": [run.as_dict() for run in runs], "references": references}

        def write(path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            files = sorted({*run_files(path.parent), path.name})
            path.write_text(json.dumps({**summary, "run_dir": str(path.parent), "files": files}, indent=1))

        if write_or_warn(path, write, "the summary"):
            print(f"run folder: {path.parent} (summary.json lists its files)")

    def _baseline(self, mode: str) -> RunResult:
        args = [*self.cli_args, f"--trainer.strategy.mode={mode}", "--baselines=[]"]
        logger = self.config.fit.trainer.logger  # one named W&B logger: the baseline's run is <name>-<mode>
        if isinstance(logger, Namespace) and logger.class_path.endswith("WandbLogger") and logger.init_args.get("name"):
            args.append(f"--trainer.logger.init_args.name={logger.init_args.name}-{mode}")
        # A folder of its own inside the launched run's: its config, curves, checkpoints and W&B run.
        return DFACLI(cli_args=args, summary=False, run_dir=Path(self.run_dir) / mode, **_CLI_OPTIONS).result

    def _plot(self, runs: list[RunResult]) -> None:
        histories = {run.mode: run.history for run in runs if run.history is not None and run.history.run_dir}
        if len(histories) > 1:
            path = Path(self.run_dir) / "comparison.png"
            if write_or_warn(path, lambda p: plot_history(histories, p), "the comparison plot"):
                print(f"curves: {path}")


class MarkModelErrors(Callback):
    """Marks an error raised once a batch started, so that :func:`main` keeps its traceback (not a config error)."""

    model_ran = False

    def _ran(self, *args: Any) -> None:
        self.model_ran = True

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _ran

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.model_ran:
            exception.lightning_dfa_model_ran = True


class EpochsOfMaxSteps(Callback):
    """A run bounded by ``max_steps`` alone gets the epochs those steps span as its ``max_epochs`` (Lightning's
    -1 makes the progress bar read ``Epoch 0/-2``); ``max_steps`` still stops it."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps > 0 and math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            trainer.fit_loop.max_epochs = math.ceil(trainer.max_steps / steps_per_epoch)


def _finish_wandb(trainer: Any) -> None:
    """Close this run's W&B run, so that a baseline (or the next run in this process) gets its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and _lightning_compat.wandb_started(logger):
            try:
                logger.experiment.finish()
            except Exception as err:  # noqa: BLE001 - the run is over; its results are already saved
                warnings.warn(
                    f"Could not close the W&B run: {type(err).__name__}: {err}.", RuntimeWarning, stacklevel=2
                )


def _first_process() -> bool:
    """Whether this process is (or will be) global rank 0, from the variables that launchers set before it starts."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(int(os.environ.get(key) or 0) == 0 for key in ranks)


def _logger_configs(logger: Any) -> list[Namespace]:
    """The ``class_path`` + ``init_args`` entries of a parsed ``trainer.logger`` (one, a list, or a bool)."""
    return [lg for lg in (logger if isinstance(logger, list) else [logger]) if isinstance(lg, Namespace)]


def option_hint(message: str, parser: Any) -> str:
    """For a parser error about an unknown option, a sentence naming the closest valid options (else "")."""
    found = _lightning_compat.unknown_option(message)
    if found is None:
        return ""
    class_path, key = found
    if class_path:
        where, options = class_path, _init_options(class_path)
    else:
        where, key, options = _group_options(key, _lightning_compat.parser_dests(parser))
        where = where or "the config"
    close = closest(key, options, n=3)
    guess = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    listed = f" Its options: {options}." if options and len(options) <= 40 else ""
    return f"{key!r} is not an option of {where}{guess}{listed}"


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


def _group_options(path: str, dests: list[str]) -> tuple[str, str, list[str]]:
    """For ``"trainer.max_stepz"``: the deepest known group (``"trainer"``), the unknown key in it, its options."""
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth]) + "." if depth else ""
        options = {d[len(prefix) :].split(".")[0] for d in dests if d.startswith(prefix)}
        if options:
            return prefix[:-1], parts[depth], sorted(options - {"help", "config", "print_config"})
    return "", path, []


def _init_options(class_path: str) -> list[str]:
    """The options of ``class_path``'s ``init_args``, as jsonargparse resolves them (``**kwargs`` included)."""
    parser = LightningArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(pydoc.locate(class_path), "init", fail_untyped=False)
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    names = [dest.split(".")[1] for dest in _lightning_compat.parser_dests(parser) if dest.startswith("init.")]
    return list(dict.fromkeys(names))


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

_CLI_OPTIONS: dict[str, Any] = dict(
    parser_kwargs={"parser_mode": YAML_MODE},
    subclass_mode_model=True,
    subclass_mode_data=True,
    save_config_kwargs={"overwrite": True},
    seed_everything_default=0,
)


def main(args: list[str] | None = None) -> None:
    """The ``lightning-dfa`` console script: a configuration error is its message alone (see the module doc)."""
    try:
        run(args)
    except CONFIGURATION_ERRORS as err:
        if os.environ.get(DEBUG_ENV) or getattr(err, "lightning_dfa_model_ran", False):
            raise
        sys.stderr.write(f"error: {err}\n(the traceback: {DEBUG_ENV}=1 lightning-dfa ...)\n")
        raise SystemExit(2) from None


def run(args: list[str] | None = None) -> DFACLI | None:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``) and return it, e.g. to read ``cli.trainer``."""
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["pipeline"]:  # layer-parallel DFA of a GPT-2, one process per stage (Fabric)
        from lightning_dfa.pipeline.gpt2 import main as pipeline_main

        pipeline_main(args[1:])
        return None
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
