"""The ``lightning-dfa`` command: recipes parse, resolve by name, train, and DFA learns the quick start."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_dfa.cli import main, recipe_names, resolve_recipe, run

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_recipes_are_listed_with_their_first_line(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    assert "digits-mlp" in out and "DFA quick start" in out


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


def test_baselines_run_after_fit_and_print_beside_dfa(tmp_path, capsys):
    cli = run(
        [
            "fit",
            "--config",
            "digits-mlp",
            "--baselines=[frozen, backprop]",
            "--trainer.max_steps=30",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "frozen" in line and "backprop" in line)
    assert header.split() == ["dfa", "frozen", "backprop"]
    assert "test/acc" in out and "alignment/mean" in out
    assert (tmp_path / "comparison.png").exists()
    for mode in ("dfa", "frozen", "backprop"):
        assert (tmp_path / f"history-{mode}.json").exists(), mode
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [r["mode"] for r in saved["runs"]] == ["dfa", "frozen", "backprop"]
    assert saved["runs"][0]["metrics"]["test/acc"] > 0.5
    assert cli.result.mode == "dfa"


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
