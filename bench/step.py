"""DFA versus backprop: training-step time and memory on the same model and batch, measured alternately.

    python bench/step.py                      # CPU: digits MLP and a 4-block tanh MLP of width 2048
    python bench/step.py --device cuda --json results.json

Prints a table and JSON. Times are medians over interleaved repeats (DFA, BP, DFA, BP, ...), so
that a noisy machine affects both sides alike; the figure that matters is the ratio. Memory is
the bytes of activations autograd saves for backward (exact and device-independent), plus the CUDA
peak when on a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dfa.feedback import FeedbackEngine


@dataclass
class Case:
    name: str
    widths: tuple[int, ...]
    classes: int
    batch: int


CASES = [
    Case("digits-mlp 64-256x3-10", (64, 256, 256, 256), 10, 32),
    Case("tanh MLP 4x2048, batch 256", (2048,) * 5, 10, 256),
]


def mlp(widths: tuple[int, ...], classes: int) -> nn.Module:
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths, widths[1:]))
    return nn.ModuleDict({"blocks": blocks, "head": nn.Linear(widths[-1], classes)})


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for block in model["blocks"]:
        x = block(x)
    return model["head"](x)


def saved_bytes(fn, model: nn.Module) -> int:
    """Bytes of the activations autograd saves for backward while ``fn`` runs (parameters excluded)."""
    total, parameters = 0, {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def measure(case: Case, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(case.batch, case.widths[0], device=device)
    y = torch.randint(0, case.classes, (case.batch,), device=device)
    runs, models = {}, {}
    for mode in ("dfa", "backprop"):
        model = mlp(case.widths, case.classes).to(device)
        FeedbackEngine(blocks="blocks.*", output="head", mode=mode).attach(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(forward(model, x), y).backward()
            optimizer.step()

        runs[mode] = step
        models[mode] = model
    for step in runs.values():  # warm up, builds the projector
        for _ in range(3):
            step()
    times = {mode: [] for mode in runs}
    peak = {}
    for _ in range(repeats):
        for mode, step in runs.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                peak[mode] = torch.cuda.max_memory_allocated()
            times[mode].append(time.perf_counter() - start)
    result = {"case": case.name, "device": device}
    for mode, step in runs.items():
        result[f"{mode}_ms"] = 1000 * statistics.median(times[mode])
        result[f"{mode}_saved_MB"] = saved_bytes(step, models[mode]) / 2**20
        if mode in peak:
            result[f"{mode}_peak_MB"] = peak[mode] / 2**20
    result["time_ratio"] = result["dfa_ms"] / result["backprop_ms"]
    result["saved_ratio"] = result["dfa_saved_MB"] / result["backprop_saved_MB"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = [measure(case, args.device, args.repeats) for case in CASES]
    print(f"{'case':<30} {'DFA ms':>8} {'BP ms':>8} {'DFA/BP':>7} {'saved MB DFA/BP':>18}")
    for r in results:
        saved = f"{r['dfa_saved_MB']:.1f}/{r['backprop_saved_MB']:.1f}"
        print(f"{r['case']:<30} {r['dfa_ms']:8.2f} {r['backprop_ms']:8.2f} {r['time_ratio']:7.2f} {saved:>18}")
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
