"""The results page: every CPU recipe trained with DFA, the frozen-blocks control and backprop.

    python bench/results.py                                   # all CPU recipes -> docs/results.md
    python bench/results.py --recipes digits-mlp vit-digits --out /tmp/results.md

Each (recipe, mode) runs as its own ``lightning-dfa fit`` process, one after the other, so that
its peak memory (the process's maximum resident set size) is its own. The commands are printed
in the page, so anyone can rerun a single cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lightning_dfa.callbacks.history import History, plot_history
from lightning_dfa.runs import latest_run

CPU_RECIPES = ["digits-mlp", "quickstart", "vit-digits", "ddpm-digits"]
MODES = ["dfa", "frozen", "backprop"]
#: The metrics shown per recipe family, in order of importance.
SHOWN = ["test/acc", "val/ppl", "test/ppl", "val/loss", "test/loss"]


def command(recipe: str, mode: str, run_dir: Path) -> list[str]:
    return [
        "lightning-dfa",
        "fit",
        "--config",
        recipe,
        f"--trainer.strategy.mode={mode}",
        "--baselines=[]",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir}",
    ]


def run(recipe: str, mode: str, root: Path) -> dict:
    run_dir = root / recipe / mode
    argv = command(recipe, mode, run_dir)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "lightning_dfa.cli", *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    base = dict(
        recipe=recipe,
        mode=mode,
        command=" ".join(argv),
        wall_s=time.perf_counter() - started,
        peak_rss_mb=usage.ru_maxrss / 1024,
        run_dir=str(run_dir),
    )
    if status != 0:  # e.g. DFA diverging: the engine's finiteness check stops the run; the page says so
        error = next((ln for ln in reversed(output.splitlines()) if "Error" in ln), output.splitlines()[-1])
        print(f"{recipe:<12} {mode:<9} FAILED: {error}", flush=True)
        return base | {
            "failed": error.strip(),
            "metrics": {},
            "steps": 0,
            "ms_per_step": float("nan"),
            "references": {},
        }
    folder = latest_run(run_dir)  # the command's version_N folder under its root
    summary = json.loads((folder / "summary.json").read_text())
    result = summary["runs"][0]
    result.update(base, run_dir=str(folder), references=summary["references"])
    print(f"{recipe:<12} {mode:<9} {result['ms_per_step']:8.1f} ms/step  {result['metrics']}", flush=True)
    return result


def page(results: list[dict], image_dir: Path) -> str:
    lines = [
        "# Results: DFA, the frozen-blocks control and backprop on the CPU recipes",
        "",
        "Produced by `python bench/results.py` (one process per cell, one after the other, on this project's",
        "2-core CPU machine). **frozen** is the frozen-blocks control: the feedback points' blocks frozen at",
        "init, everything else trained as in DFA; DFA only learns if it beats it. Peak memory is the",
        "process's maximum resident set size (Python, torch and data included), so differences are small.",
        "",
    ]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        rows = [r for r in results if r["recipe"] == recipe]
        shown = [k for k in SHOWN if any(k in r["metrics"] for r in rows)]
        lines += [f"## {recipe}", "", "| mode | " + " | ".join(shown) + " | steps | ms/step | peak RSS (MB) |"]
        lines.append("|---" * (len(shown) + 4) + "|")
        for r in rows:
            if "failed" in r:
                lines.append(f"| {r['mode']} | failed: `{r['failed'][:120]}` |" + " |" * (len(shown) + 2))
                continue
            values = [f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "-" for k in shown]
            lines.append(
                f"| {r['mode']} | "
                + " | ".join(values)
                + f" | {r['steps']} | {r['ms_per_step']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
        for key, value in next((r["references"] for r in rows if r["references"]), {}).items():
            lines.append(f"\nReference: {key} = {value:.4g}.")
        lines += ["", "Commands:", "", "```bash", *(r["command"] for r in rows), "```", ""]
        histories = {r["mode"]: Path(r["run_dir"]) / f"history-{r['mode']}.json" for r in rows}
        histories = {mode: path for mode, path in histories.items() if path.exists()}
        if histories:
            image = image_dir / f"results-{recipe}.png"
            plot_history({mode: History.load(p) for mode, p in histories.items()}, image)
            lines += [f"![{recipe}: DFA, frozen control and backprop](img/{image.name})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=CPU_RECIPES)
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--root", default="runs/results", help="where the runs are written")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args()
    results = [run(recipe, mode, Path(args.root)) for recipe in args.recipes for mode in args.modes]
    out = Path(args.out)
    (out.parent / "img").mkdir(parents=True, exist_ok=True)
    out.write_text(page(results, out.parent / "img"))
    Path(args.root, "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
