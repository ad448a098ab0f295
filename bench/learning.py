"""The learning study: DFA variants against backprop and the frozen-blocks control, over seeds.

    python bench/learning.py                                      # the study -> docs/learning.md (~1.5 h, 2 cores)
    python bench/learning.py --recipes quickstart --variants dfa embeddings --seeds 0   # one cell
    python bench/learning.py --page-only                          # rebuild the page from the saved runs

Every (recipe, variant, seed) is one ``lightning-dfa fit`` process at the recipe's own step budget,
with ``--seed_everything`` and the feedback seed both set to the seed. Finished runs are kept under
``--root`` and reused, so the study can be stopped and resumed. A variant is a mode plus DFA settings
merged into the model's ``configure_dfa()`` (``--model.init_args.dfa``), optionally with extra
command-line arguments; the table below is the whole study design.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightning_dfa.callbacks.history import History
from lightning_dfa.feedback.update_scale import auto_lr_scale
from lightning_dfa.runs import LATEST, latest_run

#: The quick start's GPT with separate input and output embeddings (GPT-2 ties them by default).
UNTIED = (
    '--model.init_args.config={"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, '
    '"n_positions": 128, "tie_word_embeddings": false}'
)


def variant(mode: str = "dfa", *args: str, **dfa: object) -> dict:
    """A mode, DFA settings merged into the model's ``configure_dfa()``, and extra command-line arguments."""
    return {"mode": mode, "dfa": dfa, "args": list(args)}


def lr_scale(scale: float, **dfa: object) -> dict:
    return variant("dfa", f"--trainer.strategy.init_args.lr_scale={scale}", **dfa)


#: The update scales compared on every recipe ("dfa" is the plugin's default, "lr_scale 1" plain DFA).
SCALES = (1, 0.3, 0.1, 0.03, 0.01)


#: Optimizer steps over which lr_scale="auto" rises from 0 (``lr_scale_ramp``), compared on every recipe.
RAMPS = (0, 150)


def scales(**dfa: object) -> dict[str, dict]:
    ramps = {
        f"lr_scale_ramp {steps}": variant("dfa", f"--trainer.strategy.init_args.lr_scale_ramp={steps}", **dfa)
        for steps in RAMPS
    }
    former = {"head_lr_scale 1": variant("dfa", "--trainer.strategy.init_args.head_lr_scale=1", **dfa)}
    return {
        "dfa": variant(**dfa),
        **{f"lr_scale {scale}": lr_scale(scale, **dfa) for scale in SCALES},
        **ramps,
        **former,
    }


BASELINES = {"backprop": variant("backprop"), "frozen": variant("frozen")}

#: recipe -> the metric reported, the error's width (where lr_scale="auto" puts it), extra arguments for every
#: run, and the variants
STUDY: dict[str, dict] = {
    "digits-mlp": {
        "metric": "test/acc",
        "error_width": 10,
        "args": [],
        "variants": {**BASELINES, **scales()},
    },
    "quickstart": {
        "metric": "val/ppl",
        "error_width": 4096,
        "args": ["--trainer.strategy.init_args.projector=gaussian"],
        "variants": {
            **BASELINES,
            **scales(),
            "embeddings": variant(embeddings=True),
            "sublayers": variant(blocks=["model.transformer.h.*.attn", "model.transformer.h.*.mlp"]),
            "embeddings first block": variant(embeddings="first_block"),
            "untied": variant("dfa", UNTIED),
            "untied, embeddings": variant("dfa", UNTIED, embeddings=True),
            "frozen untied": variant("frozen", UNTIED),
        },
    },
    "vit-digits": {
        "metric": "test/acc",
        "error_width": 10,
        "args": [],
        "variants": {**BASELINES, **scales()},
    },
    "ddpm-digits": {
        "metric": "test/loss",
        "error_width": 64,
        "args": ["--model.init_args.sample_every_n_epochs=10"],
        "variants": {
            "backprop": variant("backprop"),
            "frozen": variant("frozen", spatial_feedback=True),
            **scales(spatial_feedback=True),
            "embeddings first block": variant(spatial_feedback=True, embeddings="first_block"),
        },
    },
}


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def command(recipe: str, name: str, spec: dict, seed: int, run_dir: Path) -> list[str]:
    argv = [
        "lightning-dfa",
        "fit",
        "--config",
        recipe,
        f"--trainer.strategy.init_args.mode={spec['mode']}",
        f"--trainer.strategy.init_args.seed={seed}",
        f"--seed_everything={seed}",
        "--baselines=[]",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir}",
        *STUDY[recipe]["args"],
        "--model.init_args.dfa=null",  # the variant alone, whatever the recipe's own DFA settings are
        *spec["args"],
    ]
    if spec["dfa"]:
        argv.append(f"--model.init_args.dfa={json.dumps(spec['dfa'])}")
    return argv


def run(recipe: str, name: str, seed: int, root: Path) -> dict:
    spec = STUDY[recipe]["variants"][name]
    run_dir = root / recipe / slug(name) / f"seed{seed}"
    argv = command(recipe, name, spec, seed, run_dir)
    base = {"recipe": recipe, "variant": name, "seed": seed, "command": " ".join(_quoted(argv)), "dir": str(run_dir)}
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "lightning_dfa.cli", *argv[1:]], capture_output=True, text=True, env=env
    )
    base["wall_s"] = round(time.perf_counter() - started, 1)
    if process.returncode != 0:
        lines = (process.stdout + process.stderr).splitlines() or ["(no output)"]
        base["failed"] = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1]).strip()
        print(f"{recipe:<12} {name:<26} seed {seed}: FAILED {base['failed'][:150]}", flush=True)
    else:
        folder = latest_run(run_dir)  # the command's version_N folder under its root
        summary = json.loads((folder / "summary.json").read_text())
        first = summary["runs"][0]
        base.update(dir=str(folder), metrics=first["metrics"], references=summary["references"])
        base["ledger"] = first.get("ledger")
        print(f"{recipe:<12} {name:<26} seed {seed}: {base['metrics']} ({base['wall_s']} s)", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(base, indent=1))
    return base


def _quoted(argv: list[str]) -> list[str]:
    return [f"'{a}'" if any(ch in a for ch in ' {}[]"') else a for a in argv]


# ---------------------------------------------------------------------- the page
def aggregate(results: list[dict], recipe: str) -> list[dict]:
    metric, rows = STUDY[recipe]["metric"], []
    for name in STUDY[recipe]["variants"]:
        runs = [r for r in results if r["recipe"] == recipe and r["variant"] == name]
        values = [r["metrics"][metric] for r in runs if metric in r.get("metrics", {})]
        failed = [r for r in runs if "failed" in r]
        if not runs:
            continue
        mean = statistics.fmean(values) if values else float("nan")
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({"variant": name, "mean": mean, "std": spread, "n": len(values), "failed": len(failed)})
    return rows


def table(results: list[dict], recipe: str) -> list[str]:
    study, rows = STUDY[recipe], aggregate(results, recipe)
    by_name = {row["variant"]: row for row in rows}
    bp, frozen = by_name.get("backprop", {}).get("mean"), by_name.get("frozen", {}).get("mean")
    metric = study["metric"]
    lines = [
        f"| variant | {metric} (mean ± sd) | seeds | / backprop | / frozen | settings |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = study["variants"][row["variant"]]
        settings = ", ".join(f"{k}={v}" for k, v in spec["dfa"].items())
        settings += " ".join(a.replace("--model.init_args.", " ").replace("--", " ") for a in spec["args"])
        ratio_bp = f"{row['mean'] / bp:.2f}" if bp else "-"
        ratio_fr = f"{row['mean'] / frozen:.2f}" if frozen else "-"
        failed = f" ({row['failed']} diverged)" if row["failed"] else ""
        lines.append(
            f"| {row['variant']} | {row['mean']:.4g} ± {row['std']:.2g}{failed} | {row['n']} | {ratio_bp} | "
            f"{ratio_fr} | {spec['mode']} {settings} |"
        )
    refs = next((r["references"] for r in results if r["recipe"] == recipe and r.get("references")), {})
    lines += [f"\nReference: {key} = {value:.4g}." for key, value in refs.items()]
    return lines


#: One colour per run kind, in every panel.
COLOURS = {"backprop": "tab:blue", "frozen": "tab:orange", "dfa": "tab:green"}


def plot(results: list[dict], recipe: str, path: Path) -> Path:
    """Left: training loss (smoothed) and validation loss of backprop, the frozen control and DFA with the plugin's
    defaults, mean over seeds. Right: the final metric against ``lr_scale`` (other variants in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, colour in COLOURS.items():
        histories = _histories(results, recipe, name)
        label = "DFA (defaults)" if name == "dfa" else name
        _mean_curve(curves, [_smoothed(h.train) for h in histories], f"{label}: train", {"color": colour, "lw": 1})
        val = [[(r["step"], r["val/loss"]) for r in h.val if "val/loss" in r] for h in histories]
        _mean_curve(curves, val, f"{label}: validation", {"color": colour, "marker": "o", "ls": "none", "ms": 4})
    curves.set(title=f"{recipe}: loss (mean over seeds)", xlabel="step", ylabel="loss")
    curves.legend(fontsize=7)
    _sweep(sweep, results, recipe)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep(ax, results: list[dict], recipe: str) -> None:
    """The final metric against ``lr_scale``: each fixed scale, the default (auto) as a star, baselines as lines."""
    metric, rows = STUDY[recipe]["metric"], {row["variant"]: row for row in aggregate(results, recipe)}
    points = [(float(name.split()[1]), rows[name]) for name in rows if name.startswith("lr_scale ")]
    if points:
        points.sort()
        xs, ys, errs = zip(*[(x, row["mean"], row["std"]) for x, row in points])
        ax.errorbar(xs, ys, yerr=errs, color="grey", marker="o", label="DFA, fixed lr_scale")
    if "dfa" in rows:
        auto = auto_lr_scale((1, STUDY[recipe]["error_width"]))  # at the default head_lr_scale
        ax.errorbar(
            [auto],
            [rows["dfa"]["mean"]],
            yerr=[rows["dfa"]["std"]],
            color=COLOURS["dfa"],
            marker="*",
            markersize=12,
            ls="none",
            label=f"DFA, lr_scale='auto' = {auto:.3g}",
        )
    for name in ("backprop", "frozen"):
        if name in rows:
            ax.axhline(rows[name]["mean"], color=COLOURS[name], ls="--", label=name)
    ax.set(
        xscale="log",
        xlabel="lr_scale (points' share of the learning rate)",
        ylabel=metric,
        title=f"{recipe}: {metric} against lr_scale",
    )
    if metric.endswith("ppl"):
        ax.set_yscale("log")
    ax.legend(fontsize=7)


def _smoothed(rows: list, window: int = 20) -> list[tuple[float, float]]:
    """A moving average of ``(step, loss)`` rows (training losses are noisy per batch)."""
    out = []
    for i in range(window - 1, len(rows), max(1, window // 2)):
        chunk = rows[i - window + 1 : i + 1]
        out.append((chunk[-1][0], statistics.fmean(loss for _, loss in chunk)))
    return out


def _histories(results: list[dict], recipe: str, name: str) -> list[History]:
    mode = STUDY[recipe]["variants"][name]["mode"]
    dirs = [Path(r["dir"]) for r in results if r["recipe"] == recipe and r["variant"] == name]
    paths = [(latest_run(d) if (d / LATEST).exists() else d) / f"history-{mode}.json" for d in dirs]
    return [History.load(p) for p in paths if p.exists()]


def _mean_curve(ax, runs: list[list[tuple[float, float]]], label: str, style: dict) -> None:
    runs = [run for run in runs if run]
    if not runs:
        return
    length = min(len(run) for run in runs)
    steps = [runs[0][i][0] for i in range(length)]
    means = [statistics.fmean(run[i][1] for run in runs) for i in range(length)]
    ax.plot(steps, means, label=label, **{"marker": ".", **style})


def page(results: list[dict], recipes: list[str], image_dir: Path, intro: str) -> str:
    lines = [intro, ""]
    for recipe in recipes:
        if not any(r["recipe"] == recipe for r in results):
            continue
        image = plot(results, recipe, image_dir / f"learning-{recipe}.png")
        lines += [f"## {recipe}", "", *table(results, recipe), "", f"![{recipe}](img/{image.name})", ""]
        example = next((r for r in results if r["recipe"] == recipe and r["variant"] == "dfa"), results[0])
        lines += ["One run (all runs: `runs/learning/learning.json`):", "", "```bash", example["command"], "```", ""]
    return "\n".join(lines)


INTRO = """# Learning study: all runs

Generated by `python bench/learning.py` (the discussion is in [learning.md](learning.md)). Mean ± standard
deviation over the seeds run (column "seeds"); "/ backprop" and "/ frozen" divide the mean by theirs.
Plots: left, the training loss (moving average of 20 steps) and validation loss of backprop, the
frozen control and DFA with the plugin's defaults, mean over seeds; right, the final metric against
`lr_scale` (mean ± sd over the seeds run), with the default (`"auto"`) as a star and the baselines as
lines. Runs made before `head_lr_scale` existed trained the head at the optimizer's own rate: the variant
`head_lr_scale 1` (the dfa, frozen and `lr_scale` rows of a page generated before head_lr_scale are such runs)."""


def study_parser(description: str, out: str, seeds: list[int]) -> argparse.ArgumentParser:
    """The command line shared by the studies: which recipes and seeds, parallel runs, where runs and page go."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipes", nargs="+", default=list(STUDY))
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--root", default="runs/learning", help="finished runs are kept here and reused")
    parser.add_argument("--out", default=out)
    parser.add_argument("--page-only", action="store_true", help="only rebuild the page from saved runs")
    return parser


def run_study(args: argparse.Namespace, keep: Callable[[str], bool]) -> list[dict]:
    """Run (or reuse) every (recipe, variant, seed) whose variant ``keep`` accepts; return every saved run."""
    root = Path(args.root)
    cells = [
        (recipe, name, seed)
        for seed in args.seeds
        for recipe in args.recipes
        for name in STUDY[recipe]["variants"]
        if keep(name)
    ]
    if not args.page_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda cell: run(*cell, root), cells))
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/seed*/result.json"))]


def main() -> None:
    parser = study_parser(__doc__.splitlines()[0], "docs/learning-results.md", [0, 1, 2])
    parser.add_argument("--variants", nargs="+", help="variant names (default: all of each recipe)")
    args = parser.parse_args()
    root = Path(args.root)
    results = run_study(args, lambda name: args.variants is None or name in args.variants)
    results = [r for r in results if r["recipe"] in STUDY and r["variant"] in STUDY[r["recipe"]]["variants"]]
    (root / "learning.json").write_text(json.dumps(results, indent=1))
    out = Path(args.out)
    (out.parent / "img").mkdir(parents=True, exist_ok=True)
    out.write_text(page(results, list(STUDY), out.parent / "img", INTRO))
    print(f"wrote {out} from {len(results)} runs")


if __name__ == "__main__":
    main()
