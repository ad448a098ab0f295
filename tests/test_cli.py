"""The ``lightning-dfa`` command: recipes parse, resolve by name, train, and DFA learns the quick start."""

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import quiet_args
from jsonargparse import Namespace, dict_to_namespace

from lightning_dfa import cli
from lightning_dfa.cli import DEBUG_ENV, DFACLI, main, recipe_names, resolve_recipe, run
from lightning_dfa.models import MLPClassifier
from lightning_dfa.runs import latest_run, run_files

DIGITS = ["fit", "--config", "digits-mlp", *quiet_args()]


def test_recipes_are_listed_with_their_first_line(capsys):
    main(["recipes"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "Quick start" in lines["quickstart"]
    assert "MLP" in lines["digits-mlp"] and "quick start" not in lines["digits-mlp"].lower()


def test_a_bare_recipe_name_resolves_to_the_shipped_file():
    assert resolve_recipe("digits-mlp").endswith("lightning_dfa/recipes/digits-mlp.yaml")
    assert resolve_recipe("digits-mlp.yaml") == resolve_recipe("digits-mlp")


def test_an_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SystemExit, match=r"neither a file nor a shipped recipe; recipes: \[.*'digits-mlp'"):
        resolve_recipe("digits-cnn")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as exited:  # --print_config prints the parsed config and exits
        run(["fit", "--config", recipe, "--print_config"])
    printed = capsys.readouterr()
    assert exited.value.code in (0, None), printed.err[-2000:]
    assert "class_path: lightning_dfa" in printed.out


def test_fit_one_batch_from_the_command_line(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            *quiet_args(),
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.trainer.strategy.dfa.engine.mode == "dfa"


def test_one_override_switches_the_recipe_to_backprop(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.fast_dev_run=true",
            "--trainer.strategy.mode=backprop",
            f"--trainer.default_root_dir={tmp_path}",
            *quiet_args(),
        ]
    )
    assert cli.trainer.strategy.dfa.engine.mode == "backprop"


def run_quick_start(mode, tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            f"--trainer.strategy.mode={mode}",
            f"--trainer.default_root_dir={tmp_path}",
            *quiet_args(),
        ]
    )
    return float(cli.trainer.callback_metrics["test/acc"])


@pytest.mark.slow
def test_dfa_learns_the_digits_quick_start(tmp_path, capsys):
    dfa = run_quick_start("dfa", tmp_path / "dfa")
    backprop = run_quick_start("backprop", tmp_path / "bp")
    with capsys.disabled():
        print(f"\ndigits quick start test accuracy: DFA {dfa:.4f}, backprop {backprop:.4f}")
    assert dfa >= 0.95
    assert backprop >= 0.95


@pytest.fixture(scope="module")
def two_launches(tmp_path_factory):
    """digits-mlp with both baselines, then again without them, into one root: the issue's mixed-folder case."""
    root = tmp_path_factory.mktemp("runs")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        first = run(
            DIGITS + ["--baselines=[frozen, backprop]", "--trainer.max_steps=30", f"--trainer.default_root_dir={root}"]
        )
        run(DIGITS + ["--baselines=[]", "--trainer.max_steps=10", f"--trainer.default_root_dir={root}"])
    return {"root": root, "out": printed.getvalue(), "first": first}


@pytest.mark.slow
def test_baselines_run_after_fit_and_print_beside_dfa(two_launches):
    out = two_launches["out"]
    header = next(line for line in out.splitlines() if "frozen" in line and "backprop" in line)
    assert header.split() == ["dfa", "frozen", "backprop"]
    assert "test/acc" in out and "alignment/mean" in out
    saved = json.loads((two_launches["root"] / "version_0" / "summary.json").read_text())
    assert [r["mode"] for r in saved["runs"]] == ["dfa", "frozen", "backprop"]
    assert saved["runs"][0]["metrics"]["test/acc"] > 0.3  # 30 steps with the blocks at lr_scale: above chance (0.1)
    assert two_launches["first"].result.mode == "dfa"


@pytest.mark.slow
def test_each_launch_gets_a_new_version_folder_and_latest_points_at_the_newest(two_launches):
    root = two_launches["root"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0", "version_1"]
    assert latest_run(root) == (root / "version_1").resolve()


@pytest.mark.slow
def test_a_run_and_its_baselines_hold_their_files_in_their_version_folder(two_launches):
    files = run_files(two_launches["root"] / "version_0")
    top = {name for name in files if "/" not in name}
    assert top == {"comparison.png", "config.yaml", "curves-dfa.png", "history-dfa.json", "summary.json"}
    for mode in ("frozen", "backprop"):
        assert {f"{mode}/config.yaml", f"{mode}/history-{mode}.json", f"{mode}/curves-{mode}.png"} <= set(files)


@pytest.mark.slow
def test_a_launch_without_baselines_holds_only_its_own_files(two_launches):
    files = [name for name in run_files(two_launches["root"] / "version_1") if not name.startswith("checkpoints/")]
    assert files == ["config.yaml", "curves-dfa.png", "history-dfa.json", "summary.json"]


@pytest.mark.slow
def test_the_summary_lists_every_file_of_its_run_folder(two_launches):
    for version in ("version_0", "version_1"):
        folder = two_launches["root"] / version
        assert json.loads((folder / "summary.json").read_text())["files"] == run_files(folder)


@pytest.mark.slow
def test_config_yaml_is_the_launched_runs_config_and_each_baseline_has_its_own(two_launches):
    folder = two_launches["root"] / "version_0"
    for path, mode in [("config.yaml", "dfa"), ("frozen/config.yaml", "frozen"), ("backprop/config.yaml", "backprop")]:
        config = yaml.safe_load((folder / path).read_text())
        assert config["trainer"]["strategy"]["init_args"]["mode"] == mode, path
        # the root, not the version folder: rerunning the saved config makes a new version folder
        assert config["trainer"]["default_root_dir"] == str(two_launches["root"])


@pytest.mark.parametrize(
    ("logger", "named"),
    [
        ({"class_path": "lightning_dfa.loggers.WandbLogger", "init_args": {"name": "digits"}}, ["digits-frozen"]),
        ({"class_path": "lightning_dfa.loggers.WandbLogger", "init_args": {"project": "p"}}, []),
        ({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "digits"}}, []),
        (False, []),
    ],
)
def test_a_baselines_wandb_run_is_named_after_its_mode(monkeypatch, logger, named):
    """A named W&B logger: the baseline's run is ``<name>-<mode>``; any other logger keeps its arguments."""
    launched = SimpleNamespace(cli_args=["fit"], run_dir="runs/version_0", config=Namespace())
    launched.config["fit.trainer.logger"] = dict_to_namespace(logger) if logger else logger
    given = []
    monkeypatch.setattr(cli, "DFACLI", lambda cli_args, **kwargs: given.append(cli_args) or SimpleNamespace(result=1))
    assert DFACLI._baseline(launched, "frozen") == 1
    assert given[0][:3] == ["fit", "--trainer.strategy.mode=frozen", "--baselines=[]"]
    assert [arg.split("=")[1] for arg in given[0][3:]] == named


def test_unknown_baseline_mode_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown modes \['bp'\]; choose from \['dfa', 'backprop', 'frozen'\]"):
        run(
            [
                "fit",
                "--config",
                "digits-mlp",
                "--baselines=[bp]",
                "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path}",
                *quiet_args(),
            ]
        )


@pytest.fixture(scope="module")
def wandb_command(tmp_path_factory):
    """The digits recipe with its W&B logger, as a user runs it: a fresh process, not logged in, a new root."""
    root = tmp_path_factory.mktemp("wandb-run")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT")}
    env["HOME"] = str(root)  # no netrc: not logged in, so offline by default
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightning_dfa.cli",
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            f"--trainer.default_root_dir={root / 'runs'}",
            f"--trainer.logger.init_args.save_dir={root / 'runs'}",
        ],
        cwd=root,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    return {"root": root / "runs", "out": out, "pid": process.pid}


@pytest.mark.slow
def test_wandb_runs_offline_in_the_run_folder(wandb_command):
    assert list((latest_run(wandb_command["root"]) / "wandb").glob("offline-run-*")), wandb_command["out"][-2000:]


@pytest.mark.slow
def test_the_command_leaves_no_process_behind(wandb_command):
    time.sleep(1)
    assert session_processes(wandb_command["pid"]) == [], "processes of the command's session are still running"


@pytest.mark.parametrize(
    "warning",
    [
        "LightningCLI's args parameter is intended to run from within Python",
        "The anonymous setting has no effect",
        "does not exist",  # wandb: "git root <save_dir> does not exist"
    ],
)
def test_a_recipe_with_wandb_prints_none_of_the_warnings_the_project_caused(wandb_command, warning):
    assert warning not in wandb_command["out"]


def session_processes(session: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of /proc/PID/stat: the session id
            alive.append(int(stat.parent.name))
    return alive


def test_projector_settings_from_the_command_line_reach_the_projector(tmp_path):
    projector = "{class_path: lightning_dfa.projectors.OPU, init_args: {bit_depth: 6, encoding: ternary}}"
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.fast_dev_run=true",
            f"--trainer.strategy.projector={projector}",
            f"--trainer.default_root_dir={tmp_path}",
            *quiet_args(),
        ]
    )
    opu = cli.trainer.strategy.dfa.engine.projector
    assert type(opu).__name__ == "OPU" and opu.settings()["bit_depth"] == 6


def test_a_projector_by_name_from_the_command_line(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.fast_dev_run=true",
            "--trainer.strategy.projector=structured",
            f"--trainer.default_root_dir={tmp_path}",
            *quiet_args(),
        ]
    )
    assert type(cli.trainer.strategy.dfa.engine.projector).__name__ == "Structured"


def test_a_run_bounded_by_max_steps_counts_the_epochs_those_steps_span(tmp_path):
    # Lightning's max_epochs=-1 there made the progress bar read "Epoch 0/-2"
    cli = run(DIGITS + ["--trainer.max_epochs=-1", "--trainer.max_steps=50", f"--trainer.default_root_dir={tmp_path}"])
    batches = cli.trainer.num_training_batches
    assert batches < 50 and cli.trainer.max_epochs == math.ceil(50 / batches)
    assert cli.trainer.global_step == 50


def test_validation_every_n_steps_is_in_the_history_at_each_check_and_ends_on_the_summarys_value(tmp_path):
    tiny = "{model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2, n_positions: 128}"
    run(
        [
            "fit",
            "--config",
            "quickstart",
            "--baselines=[]",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.init_args.config={tiny}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    folder = latest_run(tmp_path)  # the CSVLogger's log_dir (the history's folder) is in it: quickstart/version_0
    history = json.loads(next(folder.rglob("history-dfa.json")).read_text())["val"]
    with next(folder.rglob("metrics.csv")).open() as file:
        logged = [float(row["val/ppl"]) for row in csv.DictReader(file) if row["val/ppl"]]
    summary = json.loads((folder / "summary.json").read_text())["runs"][0]["metrics"]
    assert [row["step"] for row in history] == [2.0, 4.0]
    assert [row["val/ppl"] for row in history] == pytest.approx(logged)
    assert history[-1]["val/ppl"] == pytest.approx(summary["val/ppl"])


def command_error(capsys, *args):
    """What ``lightning-dfa fit --config digits-mlp <args>`` prints when it stops with exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main([*DIGITS, "--trainer.fast_dev_run=true", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_wrong_projector_name_is_its_message_without_a_traceback(capsys, tmp_path):
    err = command_error(capsys, "--trainer.strategy.projector=gausian", f"--trainer.default_root_dir={tmp_path}")
    assert err.startswith("error: Unknown projector 'gausian'; known names: [")


def test_a_wrong_block_path_is_its_message_without_a_traceback(capsys, tmp_path):
    err = command_error(capsys, "--trainer.strategy.blocks=block.0", f"--trainer.default_root_dir={tmp_path}")
    assert err.startswith("error: blocks: 'block.0' matches no module of MLPClassifier. Closest paths:")


def test_the_debug_variable_shows_a_configuration_errors_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="Unknown projector 'gausian'"):
        main(
            [
                *DIGITS,
                "--trainer.fast_dev_run=true",
                "--trainer.strategy.projector=gausian",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_an_error_raised_once_the_model_runs_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(self, batch, batch_idx):
        raise ValueError("a bug in training_step")

    monkeypatch.setattr(MLPClassifier, "training_step", broken)
    with pytest.raises(ValueError, match="a bug in training_step"):
        main([*DIGITS, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.slow
def test_the_pipeline_subcommand_trains_the_pipeline_gpt2(capsys, tmp_path):
    run(["pipeline", "--pipeline-stages", "0", "--steps", "2", "--val-batches", "1", f"--out={tmp_path}"])
    assert "validation perplexity" in capsys.readouterr().out
    assert json.loads((tmp_path / "result.json").read_text())["val_ppl"] > 1
