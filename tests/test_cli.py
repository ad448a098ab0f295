"""The ``lightning-dfa`` command: recipes parse, resolve by name, train, and DFA learns the quick start."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_dfa.cli import main, recipe_names, resolve_recipe, run
from lightning_dfa.runs import latest_run, run_files

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
DIGITS = ["fit", "--config", "digits-mlp", *QUIET]


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


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_parses(recipe):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_dfa.cli", "fit", "--config", recipe, "--print_config"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path: lightning_dfa" in result.stdout


def test_fit_one_batch_from_the_command_line(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.trainer.strategy.dfa.mode == "dfa"


def test_one_override_switches_the_recipe_to_backprop(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--trainer.fast_dev_run=true",
            "--trainer.strategy.mode=backprop",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert cli.trainer.strategy.dfa.mode == "backprop"


def run_quick_start(mode, tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            f"--trainer.strategy.mode={mode}",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    return float(cli.trainer.callback_metrics["test/acc"])


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


def test_baselines_run_after_fit_and_print_beside_dfa(two_launches):
    out = two_launches["out"]
    header = next(line for line in out.splitlines() if "frozen" in line and "backprop" in line)
    assert header.split() == ["dfa", "frozen", "backprop"]
    assert "test/acc" in out and "alignment/mean" in out
    saved = json.loads((two_launches["root"] / "version_0" / "summary.json").read_text())
    assert [r["mode"] for r in saved["runs"]] == ["dfa", "frozen", "backprop"]
    assert saved["runs"][0]["metrics"]["test/acc"] > 0.5
    assert two_launches["first"].result.mode == "dfa"


def test_each_launch_gets_a_new_version_folder_and_latest_points_at_the_newest(two_launches):
    root = two_launches["root"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0", "version_1"]
    assert latest_run(root) == (root / "version_1").resolve()


def test_a_run_and_its_baselines_hold_their_files_in_their_version_folder(two_launches):
    files = run_files(two_launches["root"] / "version_0")
    top = {name for name in files if "/" not in name}
    assert top == {"comparison.png", "config.yaml", "curves-dfa.png", "history-dfa.json", "summary.json"}
    for mode in ("frozen", "backprop"):
        assert {f"{mode}/config.yaml", f"{mode}/history-{mode}.json", f"{mode}/curves-{mode}.png"} <= set(files)


def test_a_launch_without_baselines_holds_only_its_own_files(two_launches):
    files = [name for name in run_files(two_launches["root"] / "version_1") if not name.startswith("checkpoints/")]
    assert files == ["config.yaml", "curves-dfa.png", "history-dfa.json", "summary.json"]


def test_the_summary_lists_every_file_of_its_run_folder(two_launches):
    for version in ("version_0", "version_1"):
        folder = two_launches["root"] / version
        assert json.loads((folder / "summary.json").read_text())["files"] == run_files(folder)


def test_config_yaml_is_the_launched_runs_config_and_each_baseline_has_its_own(two_launches):
    folder = two_launches["root"] / "version_0"
    for path, mode in [("config.yaml", "dfa"), ("frozen/config.yaml", "frozen"), ("backprop/config.yaml", "backprop")]:
        config = yaml.safe_load((folder / path).read_text())
        assert config["trainer"]["strategy"]["init_args"]["mode"] == mode, path
        # the root, not the version folder: rerunning the saved config makes a new version folder
        assert config["trainer"]["default_root_dir"] == str(two_launches["root"])


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
                *QUIET,
            ]
        )


def test_wandb_runs_offline_and_leaves_no_process_behind(tmp_path):
    """The recipe's W&B logger writes an offline run; nothing of the session survives the command."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no netrc: not logged in, so offline by default
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
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    assert list((tmp_path / "wandb").glob("offline-run-*")), out[-2000:]
    time.sleep(1)
    assert session_processes(process.pid) == [], "processes of the command's session are still running"


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
            *QUIET,
        ]
    )
    opu = cli.trainer.strategy.dfa.projector
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
            *QUIET,
        ]
    )
    assert type(cli.trainer.strategy.dfa.projector).__name__ == "Structured"
