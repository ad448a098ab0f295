"""The README's Python snippets run as written, and its comment names every strategy the package registers."""

import re
from pathlib import Path

import pytest
from lightning.pytorch.strategies import StrategyRegistry

import lightning_dfa  # noqa: F401 - registers the strategies

README = (Path(__file__).parents[1] / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_each_readme_snippet_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the Trainer writes its logs and checkpoints
    exec(compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})


def test_the_readmes_import_comment_names_every_registered_strategy():
    registered = {name for name in StrategyRegistry.available_strategies() if name.startswith("dfa")}
    comment = re.search(r"import lightning_dfa  # registers (.*)", README)[1]
    assert set(re.findall(r'"(\w+)"', comment)) == registered
