"""Bit-identity check for speed changes to the OPU emulator: record its outputs once, compare after every change.

    python bench/opu_identity.py --record /tmp/opu-outputs.pt    # before the change
    python bench/opu_identity.py --check /tmp/opu-outputs.pt     # after it: every output torch.equal, or a report

The configurations cover the dense and the sparse frame paths (softmax-minus-one-hot errors), the CPU's index_add_
path, camera on and off, ADC dither on and off, blank frames, row sampling, device tiling, every encoding, float32
and float64 input, more vectors than one pass, several calls in a row (the call counter seeds the noise), and the
quick start's own shape (1024 softmax-minus-one-hot vectors of width 4096 to 512 outputs). Each configuration runs
three calls; every output, ``stats`` and ``totals`` are recorded.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from lightning_dfa.projectors import opu as opu_module
from lightning_dfa.projectors.opu import OPU

CALLS = 3


def softmax_minus_one_hot(
    rows: int, width: int, seed: int, sharpness: float = 1.0, targets: int | None = None
) -> torch.Tensor:
    """Errors like a language model's output point: ``softmax(logits) - one_hot(target)``, scaled by 1 / rows
    (``targets``: drawn among the first ``targets`` pixels only, so that few pixels are lit over a pass)."""
    generator = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(rows, width, generator=generator)
    target = torch.randint(0, targets or width, (rows,), generator=generator)
    return (logits.softmax(1) - torch.nn.functional.one_hot(target, width)) / rows


def gaussian(rows: int, width: int, seed: int, support: int | None = None) -> torch.Tensor:
    """Gaussian errors, non-zero on the first ``support`` pixels only if given."""
    error = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    return error if support is None else error.index_fill_(1, torch.arange(support, width), 0.0)


#: name -> (OPU arguments, error maker (call index -> error)).
CONFIGS = {
    "dense-default": (dict(in_features=300, out_features=200), lambda c: gaussian(600, 300, c)),
    "dense-float64": (dict(in_features=300, out_features=200), lambda c: gaussian(300, 300, c).double()),
    "dense-tile-128": (dict(in_features=300, out_features=300, tile=128), lambda c: gaussian(300, 300, c)),
    "softmax-default": (dict(in_features=1024, out_features=256), lambda c: softmax_minus_one_hot(600, 1024, c)),
    "softmax-float64": (
        dict(in_features=1024, out_features=256),
        lambda c: softmax_minus_one_hot(300, 1024, c).double(),
    ),
    "softmax-tile-128": (
        dict(in_features=1024, out_features=300, tile=128),
        lambda c: softmax_minus_one_hot(600, 1024, c),
    ),
    "softmax-sharp-ternary": (  # few lit pixels: the sparse path, index_add_ on the CPU
        dict(in_features=2048, out_features=256, encoding="ternary"),
        lambda c: softmax_minus_one_hot(600, 2048, c, sharpness=4.0),
    ),
    "softmax-sharp-bitplanes": (
        dict(in_features=2048, out_features=256),
        lambda c: softmax_minus_one_hot(600, 2048, c, sharpness=4.0),
    ),
    "sparse-index-add-ternary": (  # few lit pixels in every pass: the sparse path, index_add_ on the CPU
        dict(in_features=2048, out_features=256, encoding="ternary"),
        lambda c: softmax_minus_one_hot(600, 2048, c, sharpness=12.0, targets=64),
    ),
    "sparse-index-add-bitplanes": (
        dict(in_features=2048, out_features=300, tile=128),
        lambda c: softmax_minus_one_hot(600, 2048, c, sharpness=12.0, targets=64),
    ),
    "sparse-matmul": (  # few lit pixels, densely lit: the sparse path's matmul
        dict(in_features=300, out_features=200),
        lambda c: gaussian(600, 300, c, support=40),
    ),
    "sparse-matmul-tiled": (
        dict(in_features=1200, out_features=200, max_input=500, max_output=64, allow_tiling=True, tile=128),
        lambda c: gaussian(300, 1200, c, support=200),
    ),
    "camera-off": (dict(in_features=300, out_features=200, camera=False), lambda c: gaussian(300, 300, c)),
    "camera-off-softmax": (
        dict(in_features=1024, out_features=256, camera=False),
        lambda c: softmax_minus_one_hot(300, 1024, c),
    ),
    "no-adc-dither": (dict(in_features=300, out_features=200, adc_dither=False), lambda c: gaussian(300, 300, c)),
    "no-blank-frames": (dict(in_features=300, out_features=200, blank_frames=0), lambda c: gaussian(300, 300, c)),
    "blank-frames-16": (dict(in_features=300, out_features=200, blank_frames=16), lambda c: gaussian(300, 300, c)),
    "sample-rows-half": (dict(in_features=300, out_features=200, sample_rows=0.5), lambda c: gaussian(600, 300, c)),
    "tiled": (
        dict(in_features=300, out_features=200, max_input=128, max_output=64, allow_tiling=True),
        lambda c: gaussian(300, 300, c),
    ),
    "tiled-softmax": (
        dict(in_features=1024, out_features=200, max_input=400, max_output=64, allow_tiling=True, tile=128),
        lambda c: softmax_minus_one_hot(300, 1024, c),
    ),
    "encoding-none": (dict(in_features=300, out_features=200, encoding=None), lambda c: gaussian(300, 300, c)),
    "ternary": (dict(in_features=300, out_features=200, encoding="ternary"), lambda c: gaussian(600, 300, c)),
    "bitplanes-2": (dict(in_features=300, out_features=200, bits=2), lambda c: gaussian(600, 300, c)),
    "bitplanes-2-softmax": (
        dict(in_features=1024, out_features=256, bits=2),
        lambda c: softmax_minus_one_hot(300, 1024, c),
    ),
    "fixed-anchor": (dict(in_features=300, out_features=200, anchor_pixels=8), lambda c: gaussian(300, 300, c)),
    "legacy-generator": (dict(in_features=300, out_features=200, generator="cpu"), lambda c: gaussian(300, 300, c)),
    "nonfinite-row": (
        dict(in_features=300, out_features=200),
        lambda c: gaussian(300, 300, c).index_fill_(0, torch.tensor([5]), float("nan")),
    ),
    "no-rows": (dict(in_features=300, out_features=200), lambda c: torch.zeros(0, 300)),
    "quickstart": (dict(in_features=4096, out_features=512), lambda c: softmax_minus_one_hot(1024, 4096, c)),
}


def outputs() -> dict:
    """Every configuration's outputs, stats and totals over :data:`CALLS` calls."""
    results = {}
    for name, (kwargs, make) in CONFIGS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opu = OPU(**kwargs, seed=3)
            calls = [opu(make(c)) for c in range(CALLS)]
        results[name] = {"outputs": calls, "stats": dict(opu.stats), "totals": dict(opu.totals)}
    return results


def compare(old: dict, new: dict) -> list[str]:
    """Lines describing every difference (empty: bit-identical)."""
    problems = []
    for name in CONFIGS:
        a, b = old[name], new[name]
        for c, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
            if not torch.equal(x.nan_to_num(1e30), y.nan_to_num(1e30)) or x.dtype != y.dtype:
                scale = float(x.nan_to_num(0).abs().max()) or 1.0
                diff = float((x - y).nan_to_num(0).abs().max())
                problems.append(f"{name} call {c}: max |diff| {diff:.3g} ({diff / scale:.3g} of the output's max)")
        for key in ("stats", "totals"):
            if a[key] != b[key]:
                problems.append(f"{name} {key}: {a[key]} != {b[key]}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", help="save the outputs to this file")
    group.add_argument("--check", help="compare the outputs with those saved in this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.record:
        results = outputs()
        torch.save(results, args.record)
        print(f"recorded {len(results)} configurations x {CALLS} calls to {args.record}")
        return
    recorded, problems = torch.load(args.check), []
    # The outputs may not depend on how many passes share a sweep of the medium: the default, every pass on its
    # own (0), and all of a call's passes in one group (a huge budget). Code without groups runs once.
    default = getattr(opu_module, "GROUP_MEMORY", None)
    for memory in (default,) if default is None else (default, 0.0, 1e9):
        if memory is not None:
            opu_module.GROUP_MEMORY = memory
        problems += [f"GROUP_MEMORY={memory}: {line}" for line in compare(recorded, outputs())]
    print("\n".join(problems) if problems else f"bit-identical: {len(CONFIGS)} configurations x {CALLS} calls")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
