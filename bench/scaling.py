"""Training-step time versus depth and width of a GPT family: backprop, DFA on the device, DFA with optical projections.

    python bench/scaling.py                       # CPU, ~10 min: depth 2-32 at width 256, width 128-1024 at depth 4
    python bench/scaling.py --depths 2,4,8 --widths 128,256 --repeats 3                            # a quick look
    python bench/scaling.py --device cuda --vocab 50257 --batch 8 --seq 1024 --base-width 1024 \\
        --depths 6,12,24,48 --widths 512,1024,2048,4096 \\
        --json bench/out/scaling-cuda.json --plot docs/img/scaling-cuda.png

For every (depth, width) of GPT-2-shaped models (``n_head = width / 64``, vocabulary ``--vocab``, error at the
logits, one feedback point per block), one model and batch are timed as in ``bench/step.py``: each round runs a
training step (forward, loss, backward, AdamW) of (a) backprop and (b) DFA with each projector computed on
the device (dense ``gaussian``, ``structured``), in a rotated order, median over ``--repeats`` rounds. The
projector's own time is measured in every DFA step, so (c), DFA with the projection done by an OPU, is that
step with the measured projection replaced by the cost model's optical time
(``lightning_dfa.projectors.cost.optical_cost``: ternary input, 4 frames of 0.5 ms per error vector, one
vector per token, more device passes past 1,039,680 input or 2,073,600 output pixels).

Each variant's step time is fitted by least squares (non-negative) to ``t = c0 + c1 L d^2 + c2 L d + c3 d``
(L depth, d width: the blocks' matmuls, the per-block work linear in width and the dense projection, the
head and embeddings), and the fits are extrapolated along GPT-shaped models (``L = d / 64``) to find where
optical DFA would overtake backprop and DFA with the projection on the device. Prints tables and writes
JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import CLOCKS, Variant, causal_lm_loss, dfa_variant, optical_ms, run_rounds, timed_step  # noqa: E402

FEATURES = ("1", "L d^2", "L d", "d")
#: Device limits of the OPU in the cost model (one device pass each way).
MAX_OUTPUT = 1920 * 1080


# ---------------------------------------------------------------------------------------------- measuring
def gpt(depth: int, width: int, vocab: int, seq: int) -> torch.nn.Module:
    """A GPT-2 of ``depth`` blocks of ``width`` (heads of 64, at least one), random init, dropout as GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    heads, last = max(1, width // 64), vocab - 1
    config = GPT2Config(
        n_layer=depth,
        n_embd=width,
        n_head=heads,
        n_positions=seq,
        vocab_size=vocab,
        bos_token_id=last,
        eos_token_id=last,
    )
    return GPT2LMHeadModel(config)


def measure_point(depth: int, width: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Step times of backprop and of DFA with each projector on one model, rounds interleaved."""
    torch.manual_seed(0)
    model = gpt(depth, width, args.vocab, args.seq).to(device).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    setup = {"model": model, "inputs": (ids,), "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4)}

    def step() -> None:
        causal_lm_loss(model, ids).backward()
        setup["optimizer"].step()

    points = {"blocks": "auto", "output": "lm_head"}
    variants = [Variant("backprop", None)] + [dfa_variant(p, points) for p in args.projectors.split(",")]
    for variant in variants:
        for _ in range(args.warmup):
            timed_step(variant, step, setup, device)
        variant.instrument(device, CLOCKS[args.clock])
    run_rounds(variants, step, setup, device, args)
    params = sum(p.numel() for p in model.parameters())
    return [point_row(v, depth, width, params, args) for v in variants]


def point_row(variant: Variant, depth: int, width: int, params: int, args: argparse.Namespace) -> dict:
    row = {
        "depth": depth,
        "width": width,
        "params": params,
        "tokens": args.batch * args.seq,
        "variant": variant.name,
        "ms": 1000 * statistics.median(variant.times),
        "ratio": statistics.median(variant.ratios),
    }
    if variant.engine is not None:
        row["projection_ms"] = statistics.median(variant.projection)
        row["opu_ms"] = optical_ms(variant.engine.projector, variant.rows)
        row["electronic_ms"] = row["ms"] - row["projection_ms"]  # the DFA step without its projection
    return row


def variants_of(rows: list[dict]) -> list[str]:
    """The measured variants plus variant (c), ``dfa:opu-model``."""
    return [*dict.fromkeys(r["variant"] for r in rows), "dfa:opu-model"]


def components(rows: list[dict]) -> list[dict]:
    """The series that are fitted: ``backprop``; ``electronic``, a DFA step without its projection (the mean over
    the DFA variants at each point); ``projection:<name>``, each projector's own time."""
    out = [{**r, "series": "backprop"} for r in rows if r["variant"] == "backprop"]
    dfa = [r for r in rows if r["variant"].startswith("dfa:")]
    for point in dict.fromkeys((r["depth"], r["width"]) for r in dfa):
        here = [r for r in dfa if (r["depth"], r["width"]) == point]
        electronic = statistics.mean(r["electronic_ms"] for r in here)
        out.append({**here[0], "series": "electronic", "ms": electronic})
    out += [{**r, "series": "projection:" + r["variant"][4:], "ms": r["projection_ms"]} for r in dfa]
    return out


# ---------------------------------------------------------------------------------------------- fitting
def features(depth: float, width: float) -> np.ndarray:
    return np.array([1.0, depth * width**2, depth * width, width])


def fit(rows: list[dict]) -> dict:
    """Non-negative least squares of each series' ``ms`` on :data:`FEATURES` (relative errors weigh equally),
    and the OPU's optical ms per step and device pass (constant: the cost model's)."""
    parts = components(rows)
    fits = {}
    for name in dict.fromkeys(r["series"] for r in parts):
        own = [r for r in parts if r["series"] == name]
        a = np.array([features(r["depth"], r["width"]) / r["ms"] for r in own])
        if name.startswith("projection:"):  # a projection's work is linear in L d (and the error's size)
            a[:, 1] = 0
        coef, _ = nnls(a, np.ones(len(own)))
        fits[name] = coef.tolist()
    fits["optical_pass_ms"] = next(r["opu_ms"] for r in rows if "opu_ms" in r)
    return fits


def predict(fits: dict, variant: str, depth: float, width: float, speedup: float = 1.0) -> float:
    """Predicted ms per step of ``variant``; electronic times divided by ``speedup``, optical time not.

    DFA on the device is ``electronic + projection``; optical DFA is ``electronic + optical``, where the optical
    time does not depend on the sizes within one device pass (the error, the vocabulary, stays within one input
    pass; the feedback, depth x width, takes ``ceil(L d / 2,073,600)`` output passes).
    """

    def part(name: str) -> float:
        return float(features(depth, width) @ np.array(fits[name])) / speedup

    if variant == "backprop":
        return part("backprop")
    if variant == "dfa:opu-model":
        return part("electronic") + fits["optical_pass_ms"] * -(-int(depth * width) // MAX_OUTPUT)
    return part("electronic") + part("projection:" + variant[4:])


def extrapolate(fits: dict, variants: list[str], widths: list[int]) -> list[dict]:
    """Predicted step times along GPT-shaped models (depth = width / 64)."""
    out = []
    for width in widths:
        depth = max(1, width // 64)
        row = {"depth": depth, "width": width, "params_M": 12 * depth * width**2 / 1e6}
        row |= {f"{v}_ms": predict(fits, v, depth, width) for v in variants}
        out.append(row)
    return out


def crossing(fits: dict, variants: list[str], speedup: float = 1.0) -> dict:
    """The smallest GPT-shaped width (depth = width / 64, a multiple of 64) where optical DFA beats each rival.

    ``speedup`` divides every electronic time (a device that many times faster than the measured one); the
    optical time stays. The search stops at 64 output passes of the OPU.
    """
    found = {}
    rivals = [v for v in variants if v != "dfa:opu-model"]
    for width in range(64, 1 << 18, 64):
        depth = width // 64
        if depth * width > 64 * MAX_OUTPUT:
            break
        optical = predict(fits, "dfa:opu-model", depth, width, speedup)
        for rival in rivals:
            if rival not in found and optical < predict(fits, rival, depth, width, speedup):
                found[rival] = {"width": width, "depth": depth, "params_M": 12 * depth * width**2 / 1e6}
    return {rival: found.get(rival) for rival in rivals}


# ---------------------------------------------------------------------------------------------- output
def measured(rows: list[dict], variant: str) -> list[tuple[int, int, float]]:
    """``(depth, width, ms)`` of a variant; for ``dfa:opu-model`` the electronic part measured plus optical time."""
    if variant != "dfa:opu-model":
        return [(r["depth"], r["width"], r["ms"]) for r in rows if r["variant"] == variant]
    parts = [r for r in components(rows) if r["series"] == "electronic"]
    return [(r["depth"], r["width"], r["ms"] + r["opu_ms"]) for r in parts]


def plot(rows: list[dict], fits: dict, extrapolated: list[dict], args: argparse.Namespace, path: str) -> None:
    """Measured points and fits against depth and width, and the extrapolated ratios to backprop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    variants = variants_of(rows)
    colors = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, axis in zip(axes, ("depth", "width")):
        fixed = args.base_width if axis == "depth" else args.base_depth
        for variant in variants:
            own = sorted(
                (d if axis == "depth" else w, ms)
                for d, w, ms in measured(rows, variant)
                if (w if axis == "depth" else d) == fixed
            )
            grid = np.linspace(own[0][0], own[-1][0], 50)
            sizes = [(g, fixed) if axis == "depth" else (fixed, g) for g in grid]
            ax.plot(*zip(*own), "o", color=colors[variant], label=variant)
            ax.plot(grid, [predict(fits, variant, *size) for size in sizes], "-", color=colors[variant], alpha=0.6)
        other = "width" if axis == "depth" else "depth"
        title = f"{other} {fixed}, {args.batch * args.seq} tokens per step"
        ax.set(xlabel=axis, ylabel="ms per training step (points: measured, lines: fit)", yscale="log", title=title)
        ax.legend(fontsize=8)
    ax = axes[2]
    params = [e["params_M"] for e in extrapolated]
    for variant in variants[1:]:
        ratios = [e[f"{variant}_ms"] / e["backprop_ms"] for e in extrapolated]
        ax.plot(params, ratios, "-o", color=colors[variant], label=f"{variant} / backprop")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="block parameters (M), depth = width / 64",
        ylabel="step time / backprop's (fits extrapolated)",
        title="extrapolated along GPT shapes",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def print_measured(rows: list[dict]) -> None:
    print(
        f"{'depth':>5} {'width':>5} {'params M':>9} {'variant':<16} {'ms':>9} {'x BP':>6} {'proj ms':>8} {'OPU ms':>8}"
    )
    for r in rows:
        proj = f"{r['projection_ms']:8.1f}" if "projection_ms" in r else " " * 8
        opu = f"{r['opu_ms']:8.1f}" if "opu_ms" in r else " " * 8
        print(
            f"{r['depth']:>5} {r['width']:>5} {r['params'] / 1e6:9.2f} {r['variant']:<16} {r['ms']:9.1f} "
            f"{r['ratio']:6.2f} {proj} {opu}"
        )


def print_fits(fits: dict, variants: list[str], extrapolated: list[dict], crossings: dict) -> None:
    print("\nfits, ms = " + " + ".join(f"c{i} {f}" for i, f in enumerate(FEATURES)))
    for name, coef in fits.items():
        if name != "optical_pass_ms":
            print(f"  {name:<24} " + " ".join(f"{c:10.3e}" for c in coef))
    print(f"  optical (cost model)     {fits['optical_pass_ms']:.1f} ms per step and device pass")
    print("\nextrapolated along depth = width / 64 (ms per step)")
    print(f"{'depth':>5} {'width':>6} {'params M':>10} " + " ".join(f"{v:>16}" for v in variants))
    for e in extrapolated:
        cells = " ".join(f"{e[v + '_ms']:16.4g}" for v in variants)
        print(f"{e['depth']:>5} {e['width']:>6} {e['params_M']:10.1f} {cells}")
    print("\noptical DFA first beats, along GPT shapes (within 64 output passes of the OPU), with electronic")
    print("times divided by a speed-up (1: the device measured here):")
    for speedup, found in crossings.items():
        for rival, where in found.items():
            text = "never in range"
            if where is not None:
                text = f"width {where['width']}, depth {where['depth']}, {where['params_M']:.0f}M block parameters"
            print(f"  speed-up {speedup:>6}  {rival:<16} {text}")


def analyse(rows: list[dict], args: argparse.Namespace) -> dict:
    """Fits, extrapolation and crossings of the measured ``rows``; prints the tables."""
    fits = fit(rows)
    variants = variants_of(rows)
    extrapolated = extrapolate(fits, variants, [int(w) for w in args.extrapolate.split(",")])
    crossings = {s: crossing(fits, variants, float(s)) for s in args.speedups.split(",")}
    print_measured(rows)
    print_fits(fits, variants, extrapolated, crossings)
    return {"rows": rows, "fits": fits, "extrapolated": extrapolated, "crossings": crossings}


def measure_all(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The depth sweep at ``--base-width`` and the width sweep at ``--base-depth``."""
    points = [(d, args.base_width) for d in map(int, args.depths.split(","))]
    points += [(args.base_depth, w) for w in map(int, args.widths.split(",")) if (args.base_depth, w) not in points]
    rows = []
    for depth, width in points:
        rows += measure_point(depth, width, args, device)
        print(f"measured depth {depth} width {width}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--depths", default="2,4,8,16,32", help="depths swept at --base-width")
    parser.add_argument("--widths", default="128,256,512,1024", help="widths swept at --base-depth")
    parser.add_argument("--base-depth", type=int, default=4)
    parser.add_argument("--base-width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary: the error's size (4096: quickstart's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--projectors",
        default="gaussian,structured",
        help="device projectors; the first one's step (without its projection) is the electronic part of optical DFA",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="cpu (default on the CPU) or wall (default on GPUs)")
    parser.add_argument(
        "--extrapolate",
        default="256,512,1024,2048,4096,8192,16384,32768",
        help="widths of the extrapolation table (depth = width / 64)",
    )
    parser.add_argument(
        "--speedups",
        default="1,10,100,1000",
        help="electronic speed-ups (a faster device than this one) for the crossing table",
    )
    parser.add_argument("--from-json", help="refit and replot the measurements saved in this JSON, measure nothing")
    parser.add_argument("--json", default="bench/out/scaling.json")
    parser.add_argument("--plot", default="docs/img/scaling.png")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if args.from_json:  # refit and replot saved measurements
        saved = json.loads(Path(args.from_json).read_text())
        rows = [r for r in saved["rows"] if r["variant"] not in ("electronic", "dfa:opu-model")]  # older files
        meta = saved["meta"]
        vars(args).update({k: meta["args"][k] for k in ("base_depth", "base_width", "batch", "seq")})
    else:
        rows = measure_all(args, device)
        meta = {
            "args": vars(args),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        }
    result = {"meta": meta, **analyse(rows, args)}
    print(
        f"clock {meta['args']['clock']}, threads {meta['threads']}, load average before "
        f"{meta['load_before'][0]:.2f}, after {meta['load_after'][0]:.2f}"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    plot(result["rows"], result["fits"], result["extrapolated"], args, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
