"""The installed package: recipes ship inside the wheel, the console script is declared."""

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
