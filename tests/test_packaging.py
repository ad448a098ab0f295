"""The installed package: recipes ship inside the wheel, the console script is declared."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_recipe_and_the_console_script(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("lightning_dfa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"lightning_dfa/recipes/{recipe.name}" in names, recipe.name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lightning-dfa = lightning_dfa.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_top_level_recipes_folder_is_the_packaged_one():
    assert (ROOT / "recipes").resolve() == (ROOT / "lightning_dfa" / "recipes").resolve()
    assert 'lightning_dfa = ["recipes/*.yaml"]' in (ROOT / "pyproject.toml").read_text()


def test_the_feedback_engine_imports_no_lightning():
    code = (
        "import sys, lightning_dfa.feedback\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_importing_lightning_after_the_package_registers_the_strategies():
    code = (
        "import lightning_dfa\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "print('dfa_fsdp' in StrategyRegistry)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "True", result.stderr[-2000:]
