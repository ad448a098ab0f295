"""The gap as training goes on: the quick start's DFA against backprop and the frozen control, by steps and width.

    python bench/gap.py                                   # 400 / 1600 steps x widths 128 / 256, seed 0
    python bench/gap.py --steps 400 1600 6400 --widths 128 --seeds 0 1 2
    python bench/gap.py --page-only                       # the table and figure from the saved runs

Every cell is the quick start recipe at the plugin's defaults (``bench/learning.py``'s machinery, same cache),
with ``--trainer.max_steps`` set (the warmup and cosine schedule keep their shape: the cosine spans the run) and
``n_embd`` set (4 layers, 4 heads). Printed and drawn: validation perplexity of DFA, frozen control and backprop,
and the ratios DFA / backprop and DFA / frozen, per width, against steps; backprop's best validation check too
(on this small corpus backprop overfits in long runs: its final perplexity rises again).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import learning  # bench/learning.py: the run machinery
import matplotlib.pyplot as plt

MODES = ("dfa", "frozen", "backprop")


def model_config(width: int) -> str:
    config = {"model_type": "gpt2", "n_layer": 4, "n_embd": width, "n_head": 4, "n_positions": 128}
    return f"--model.init_args.config={json.dumps(config)}"


def name(mode: str, steps: int, width: int) -> str:
    return f"{mode} {steps} steps width {width}"


def register(steps: list[int], widths: list[int]) -> None:
    """Add the cells to the quick start's variants of the learning study."""
    variants = learning.STUDY["quickstart"]["variants"]
    for mode in MODES:
        for n in steps:
            for width in widths:
                variants[name(mode, n, width)] = learning.variant(mode, f"--trainer.max_steps={n}", model_config(width))


def metric(results: list[dict], mode: str, steps: int, width: int, best: bool = False) -> list[float]:
    """The runs' final validation perplexity, or (``best``) the lowest of their validation checks."""
    runs = [r for r in results if r["recipe"] == "quickstart" and r["variant"] == name(mode, steps, width)]
    return [best_val_ppl(r) if best else r["metrics"]["val/ppl"] for r in runs if "metrics" in r]


def best_val_ppl(result: dict) -> float:
    """The lowest validation perplexity of a run's checks (its History file): backprop overfits the small corpus."""
    history = next(Path(result["dir"]).glob("history-*.json"))
    return min(check["val/ppl"] for check in json.loads(history.read_text())["val"])


def table(results: list[dict], steps: list[int], widths: list[int]) -> list[str]:
    header = (
        "| width | steps | DFA | frozen | backprop | DFA / backprop | DFA / frozen | best BP | DFA / best BP | seeds |"
    )
    lines = [header, "|---" * 10 + "|"]
    for width in widths:
        for n in steps:
            runs = {mode: metric(results, mode, n, width) for mode in MODES}
            if not all(runs.values()):
                continue
            mean = {mode: statistics.mean(v) for mode, v in runs.items()}
            cells = " | ".join(f"{mean[m]:.1f}" for m in MODES)
            seeds = min(len(v) for v in runs.values())
            best = statistics.mean(metric(results, "backprop", n, width, best=True))
            lines.append(
                f"| {width} | {n} | {cells} | {mean['dfa'] / mean['backprop']:.2f} | "
                f"{mean['dfa'] / mean['frozen']:.2f} | {best:.1f} | {mean['dfa'] / best:.2f} | {seeds} |"
            )
    return lines


def plot(results: list[dict], steps: list[int], widths: list[int], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for width in widths:
        done = [n for n in steps if all(metric(results, m, n, width) for m in MODES)]
        means = {m: [statistics.mean(metric(results, m, n, width)) for n in done] for m in MODES}
        line = axes[0].plot(
            done, [d / b for d, b in zip(means["dfa"], means["backprop"])], "o-", label=f"width {width}"
        )
        best = [statistics.mean(metric(results, "backprop", n, width, best=True)) for n in done]
        axes[0].plot(
            done,
            [d / b for d, b in zip(means["dfa"], best)],
            "x--",
            color=line[0].get_color(),
            label=f"width {width}, backprop's best check",
        )
        axes[1].plot(done, [d / f for d, f in zip(means["dfa"], means["frozen"])], "o-", label=f"width {width}")
    for ax, title in zip(axes, ("DFA / backprop (val ppl)", "DFA / frozen control (val ppl)")):
        ax.set_xscale("log")
        ax.set_xlabel("training steps")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", type=int, default=[400, 1600])
    parser.add_argument("--widths", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--root", default="runs/learning", help="finished runs are kept here and reused")
    parser.add_argument("--figure", default="docs/img/learning-gap.png")
    parser.add_argument("--page-only", action="store_true")
    args = parser.parse_args()
    register(args.steps, args.widths)
    study = argparse.Namespace(recipes=["quickstart"], seeds=args.seeds, jobs=1, root=args.root)
    study.page_only = args.page_only
    wanted = {name(m, n, w) for m in MODES for n in args.steps for w in args.widths}
    results = learning.run_study(study, lambda variant: variant in wanted)
    print("\n".join(table(results, args.steps, args.widths)))
    plot(results, args.steps, args.widths, Path(args.figure))
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
