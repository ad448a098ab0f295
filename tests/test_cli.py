"""The ``lightning-dfa`` command: recipes parse, resolve by name, train, and DFA learns the quick start."""

import subprocess
import sys

import pytest

from lightning_dfa.cli import main, recipe_names, resolve_recipe

QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_recipes_are_listed_with_their_first_line(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    assert "digits-mlp" in out and "DFA quick start" in out


def test_a_bare_recipe_name_resolves_to_the_shipped_file():
    assert resolve_recipe("digits-mlp").endswith("lightning_dfa/recipes/digits-mlp.yaml")
    assert resolve_recipe("digits-mlp.yaml") == resolve_recipe("digits-mlp")


def test_an_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(SystemExit, match=r"neither a file nor a shipped recipe; recipes: \['digits-mlp'"):
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
    cli = main(
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
    cli = main(
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
    cli = main(
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
