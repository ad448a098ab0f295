"""The optical path study: what the OPU emulator's settings cost in learning and in optical time per step.

    python bench/optical.py                                        # screen (seed 0), then --seeds 1 2 on the frontier
    python bench/optical.py --recipes quickstart --cells "opu" "opu bitplanes 2" --seeds 0 1 2
    python bench/optical.py --page-only                            # rebuild docs/optical-results.md and the figures

Every cell is one run of ``bench/learning.py``'s machinery (same command, same cache under ``runs/learning``):
the recipe with the plugin's DFA defaults and the recipe's own DFA settings, its projector replaced by the
``OPU`` emulator with the cell's settings. The reference is the same run with the dense Gaussian projection
(``dfa`` in the learning study). For every cell the page gives the metric (mean ± sd over the seeds run), the
optical time per training step that the run's ``OpticalLedger`` priced (frames per vector x vectors sent x
frame time) and the electronic time of the same projection measured on this machine, and draws learning
against optical time per step (the Pareto figure of docs/emulator.md).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import learning  # bench/learning.py: the run machinery and the Gaussian references

#: The former defaults: ternary input (threshold 0.5 x the row's rms), no blank-frame offset.
UNCALIBRATED = {"blank_frames": 0}
TERNARY = {"encoding": "ternary", **UNCALIBRATED}


def opu(spec: dict, **settings: object) -> dict:
    """The recipe's DFA variant ``spec`` with the OPU emulator (``settings`` on top of its defaults) as projector."""
    projector = json.dumps({"class_path": "opu", "init_args": settings})
    return {**spec, "args": [*spec["args"], f"--trainer.strategy.init_args.projector={projector}"]}


def optical_cells(spec: dict, sequence: bool) -> dict[str, dict]:
    """The study design: one axis at a time around the OPU's defaults (a dithered bit plane per sign, 8-bit camera
    with noise, blank-frame offset), and around the former defaults (ternary input, no offset calibration)."""
    cells = {
        "opu": opu(spec),
        "opu no noise": opu(spec, shot_noise=False, read_noise=0.0),
        **{f"opu camera {b} bits": opu(spec, bit_depth=b) for b in (6, 10, 12)},
        "opu exposure 0.1": opu(spec, exposure=0.1),
        "opu no noise, no quantisation": opu(spec, shot_noise=False, read_noise=0.0, bit_depth=None),
        "opu ideal (analog input, no camera)": opu(spec, encoding=None, camera=False),
        "opu bitplanes 1 dithered, no camera": opu(spec, camera=False),
        "opu bitplanes 2 dithered": opu(spec, bits=2),
        # without the blank-frame offset (as before it existed)
        "opu bitplanes 1 dithered": opu(spec, blank_frames=0),
        "opu bitplanes 1 dithered, no noise": opu(spec, blank_frames=0, shot_noise=False, read_noise=0.0),
        "opu bitplanes 1 dithered, camera 12 bits": opu(spec, blank_frames=0, bit_depth=12),
        **{f"opu bitplanes {k}": opu(spec, **UNCALIBRATED, bits=k, dither=False) for k in (1, 2, 4, 8)},
        "opu ternary": opu(spec, **TERNARY),
        "opu ternary, no camera": opu(spec, **TERNARY, camera=False),
        "opu ternary, no noise": opu(spec, **TERNARY, shot_noise=False, read_noise=0.0),
        **{f"opu ternary {t}": opu(spec, **TERNARY, threshold=t) for t in (0.1, 0.25, 1.0)},
        "opu ternary, blank_frames 64": opu(spec, **TERNARY | {"blank_frames": 64}),
    }
    if sequence:
        cells.update({f"opu, sample_rows {f}": opu(spec, sample_rows=f) for f in (0.25, 0.0625, 0.015625)})
        cells.update({f"opu ternary, sample_rows {f}": opu(spec, **TERNARY, sample_rows=f) for f in (0.25, 0.0625)})
        cells["opu bitplanes 1 dithered, sample_rows 0.0625"] = opu(spec, blank_frames=0, sample_rows=0.0625)
    return cells


HIDDEN_STATE = "--trainer.strategy.init_args.output=model.transformer.ln_f"


def register() -> None:
    """Add the optical cells to each recipe of the learning study (the Gaussian reference is its ``dfa``)."""
    for recipe, study in learning.STUDY.items():
        spec = study["variants"]["dfa"]
        study["variants"].update(optical_cells(spec, sequence=recipe == "quickstart"))
    hidden = learning.variant("dfa", HIDDEN_STATE)
    learning.STUDY["quickstart"]["variants"].update(
        {
            "gaussian, error at the last hidden state": hidden,
            "opu, error at the last hidden state": opu(hidden),
            "opu ternary, error at the last hidden state": opu(hidden, **TERNARY),
        }
    )


def is_optical(name: str) -> bool:
    return "opu" in name or "gaussian," in name


def optical_ms_per_step(result: dict) -> tuple[float, float]:
    """The optical and electronic projection time per training step (ms) that the run's ledger recorded."""
    ledger = result.get("ledger") or {}
    steps = max(ledger.get("steps", 0), 1)
    return 1e3 * ledger.get("optical_time_s", float("nan")) / steps, 1e3 * ledger.get("electronic_time_s", 0) / steps


def rows(results: list[dict], recipe: str) -> list[dict]:
    """Per cell: metric mean/sd over seeds, optical and electronic ms per step (the OPU cells and the reference)."""
    metric, out = learning.STUDY[recipe]["metric"], []
    names = ["dfa", *filter(is_optical, learning.STUDY[recipe]["variants"])]
    for name in names:
        runs = [r for r in results if r["recipe"] == recipe and r["variant"] == name and "metrics" in r]
        if not runs:
            continue
        values = [r["metrics"][metric] for r in runs]
        optical, electronic = zip(*(optical_ms_per_step(r) for r in runs))
        out.append(
            {
                "cell": "gaussian (reference)" if name == "dfa" else name,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
                "optical_ms": statistics.fmean(optical),
                "electronic_ms": statistics.fmean(electronic),
            }
        )
    return out


def table(results: list[dict], recipe: str) -> list[str]:
    metric, cells = learning.STUDY[recipe]["metric"], rows(results, recipe)
    reference = next((c for c in cells if c["cell"].startswith("gaussian (")), None)
    lines = [
        f"| cell | {metric} (mean ± sd) | seeds | / Gaussian | optical ms / step | electronic ms / step |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        ratio = f"{c['mean'] / reference['mean']:.3f}" if reference else "-"
        optical = "-" if c["cell"].startswith("gaussian") else f"{c['optical_ms']:.4g}"
        electronic = f"{c['electronic_ms']:.3g}" if c["electronic_ms"] else "-"  # runs without a ledger
        lines.append(
            f"| {c['cell']} | {c['mean']:.4g} ± {c['std']:.2g} | {c['n']} | {ratio} | {optical} | {electronic} |"
        )
    return lines


def pareto(results: list[dict], recipe: str, path: Path) -> Path:
    """Learning against modelled optical time per step; the Gaussian reference as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, cells = learning.STUDY[recipe]["metric"], rows(results, recipe)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for c in cells:
        if c["cell"].startswith("gaussian"):
            if c["cell"].startswith("gaussian ("):
                ax.axhspan(c["mean"] - c["std"], c["mean"] + c["std"], color="tab:green", alpha=0.15)
                ax.axhline(c["mean"], color="tab:green", label=f"Gaussian projection ({c['n']} seeds)")
            continue
        default = c["cell"] == "opu"
        style = {"marker": "*", "ms": 12, "color": "black"} if default else {"marker": "o", "ms": 4}
        ax.errorbar(c["optical_ms"], c["mean"], yerr=c["std"], ls="none", capsize=2, **style)
        label = "OPU defaults" if default else c["cell"].removeprefix("opu ").removeprefix("opu, ")
        ax.annotate(label, (c["optical_ms"], c["mean"]), fontsize=6)
    higher_is_better = metric.endswith("acc")
    ax.set(
        xscale="log",
        xlabel="modelled optical time per training step (ms)",
        ylabel=metric + (" (higher is better)" if higher_is_better else " (lower is better)"),
        title=f"{recipe}: learning through the OPU emulator against optical time",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


INTRO = """# Optical path study: all runs

Generated by `python bench/optical.py` (the discussion and the chosen defaults are in [emulator.md](emulator.md)).
Each cell is the recipe with the plugin's DFA defaults and the OPU emulator as projector, one setting changed
from the OPU's defaults; "gaussian (reference)" is the same run with the dense Gaussian projection. Metric: mean ±
sd over the seeds run; "/ Gaussian" divides by the reference's mean. Optical ms / step: the run's `OpticalLedger`
(frames per vector x vectors sent x 0.5 ms, the one-off calibration included); electronic ms / step: the dense
projection of the same errors timed on this machine (2-core CPU). The first round's study, at the former OPU
defaults: [optical-results-former.md](optical-results-former.md)."""


def main() -> None:
    register()
    parser = learning.study_parser(__doc__.splitlines()[0], "docs/optical-results.md", [0])
    parser.add_argument("--cells", nargs="+", help="cell names (default: every OPU cell of each recipe)")
    args = parser.parse_args()
    results = learning.run_study(args, lambda name: name in args.cells if args.cells else is_optical(name))
    out = Path(args.out)
    lines = [INTRO, ""]
    for recipe in learning.STUDY:
        if not any(r["recipe"] == recipe and "opu" in r["variant"] for r in results):
            continue
        image = pareto(results, recipe, out.parent / "img" / f"optical-{recipe}.png")
        lines += [f"## {recipe}", "", *table(results, recipe), "", f"![{recipe}](img/{image.name})", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
