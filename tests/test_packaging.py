"""The installed package: recipes ship inside the wheel, the console script is declared."""

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    assert "lightning_dfa/pipeline/gpt2.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lightning-dfa = lightning_dfa.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_top_level_recipes_folder_is_the_packaged_one():
    assert (ROOT / "recipes").resolve() == (ROOT / "lightning_dfa" / "recipes").resolve()
    assert 'lightning_dfa = ["recipes/*.yaml", "pipeline/*.yaml"]' in (ROOT / "pyproject.toml").read_text()


#: What a user may have imported before lightning-dfa.
PRELUDES = ["", "torch", "lightning", "lightning.pytorch", "lightning_dfa"]
PUBLIC_MODULES = [
    "lightning_dfa",
    "lightning_dfa.feedback",
    "lightning_dfa.callbacks",
    "lightning_dfa.models",
    "lightning_dfa.data",
    "lightning_dfa.projectors",
    "lightning_dfa.pipeline",
]

# Imports the prelude, then runs each statement in a forked child: each child is an interpreter that holds
# exactly the prelude's modules, as a fresh `python -c "<prelude>; <statement>"` would (at a fraction of the cost).
DRIVER = """
import importlib, os, sys, traceback
prelude, statements = sys.argv[1], sys.argv[2:]
if prelude:
    importlib.import_module(prelude)
children = {}
for statement in statements:
    pid = os.fork()
    if pid == 0:
        try:
            exec(statement, {})
        except BaseException:
            print(f"{statement!r} failed after {prelude!r}:", traceback.format_exc(), file=sys.stderr, flush=True)
            os._exit(1)
        os._exit(0)
    children[pid] = statement
failed = [statement for pid, statement in children.items() if os.waitpid(pid, 0)[1]]
print(len(children) - len(failed), "passed,", len(failed), "failed")
sys.exit(1 if failed else 0)
"""


def run_after(prelude: str, statements: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", DRIVER, prelude, *statements]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("prelude", PRELUDES)
def test_every_public_name_imports_in_a_fresh_interpreter_after(prelude):
    statements = [
        f"from {module} import {', '.join(importlib.import_module(module).__all__)}" for module in PUBLIC_MODULES
    ]
    result = run_after(prelude, statements)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("lightning_first", [False, True])
def test_the_strategies_are_registered_whichever_is_imported_first(lightning_first):
    imports = ["import lightning.pytorch as pl", "import lightning_dfa"]
    trainers = (
        "pl.Trainer(strategy='dfa', logger=False)",
        "pl.Trainer(strategy='dfa_ddp', accelerator='cpu', devices=2, logger=False)",
    )
    order = imports[::-1] if not lightning_first else imports
    result = run_after("", ["; ".join([*order, trainer]) for trainer in trainers])
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_package_has_no_import_hook():
    code = "import sys, lightning_dfa; print([f for f in sys.meta_path if 'lightning_dfa' in type(f).__module__])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]
