"""Step-level fidelity of the OPU emulator's camera: the issue's synthetic probe.

    python bench/fidelity.py                                  # the table: camera settings, one row each
    python bench/fidelity.py --steps 3 --cells default exposure=0.1

Errors: softmax (logits ``randn * 2.5``) minus one-hot, 1024 vectors of width 4096, a new batch per step; block
inputs ``relu(randn(1024, 128)) + 0.5``. ``OPU(4096, 512, seed=0)`` with each cell's settings; the reference is
``e @ opu.ideal_matrix()`` (same medium, no camera, no encoding). Prints, per cell, the mean per-vector cosine,
the cosine of the step's summed gradient ``F^T A`` (per step) and the step-to-step cosine of that gradient's error.
"""

from __future__ import annotations

import argparse
import ast

import torch

from lightning_dfa.projectors import OPU
from lightning_dfa.projectors.fidelity import step_fidelity

CELLS = {
    "camera=False": {"camera": False},
    "default": {},
    "former defaults (exposure 0.2, no ADC dither, blank_frames=64)": {
        "exposure": 0.2,
        "adc_dither": False,
        "blank_frames": 64,
    },
    "former, blank_frames=16384": {"exposure": 0.2, "adc_dither": False, "blank_frames": 16384},
    "former, no noise (rounding only)": {
        "exposure": 0.2,
        "adc_dither": False,
        "blank_frames": 64,
        "shot_noise": False,
        "read_noise": 0.0,
    },
    "former, bit_depth=None (noise only)": {
        "exposure": 0.2,
        "adc_dither": False,
        "blank_frames": 64,
        "bit_depth": None,
    },
    "former, no noise, bit_depth=None (saturation only)": {
        "exposure": 0.2,
        "shot_noise": False,
        "read_noise": 0.0,
        "bit_depth": None,
    },
    "former, exposure=0.8": {"exposure": 0.8, "adc_dither": False, "blank_frames": 64},
    "former, adc_dither": {"exposure": 0.2, "blank_frames": 64},
    "exposure=0.1, no dither, blank_frames=64": {"adc_dither": False, "blank_frames": 64},
    "exposure=0.1, no dither": {"adc_dither": False},
    "exposure=0.1, dither, blank_frames=64": {"blank_frames": 64},
    "default, black_level=1/32": {"black_level": 1 / 32},
    "default, no dither, black_level=1/32": {"adc_dither": False, "black_level": 1 / 32},
    "default, blank_frames=16384": {"blank_frames": 16384},
    "default, exposure=0.08": {"exposure": 0.08},
    "default, exposure=0.15": {"exposure": 0.15},
}


def probe_steps(count: int, vectors: int = 1024, width: int = 4096, inputs: int = 128, seed: int = 0) -> list:
    """``count`` steps of (softmax-minus-one-hot errors, positive block inputs), as in the module doc."""
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(count):
        error = (torch.randn(vectors, width, generator=generator) * 2.5).softmax(1)
        error[torch.arange(vectors), torch.randint(0, width, (vectors,), generator=generator)] -= 1.0
        steps.append((error, torch.relu(torch.randn(vectors, inputs, generator=generator)) + 0.5))
    return steps


def parse_cell(text: str) -> tuple[str, dict]:
    """A cell name of :data:`CELLS`, or ``key=value,key=value`` OPU settings."""
    if text in CELLS:
        return text, CELLS[text]
    settings = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        settings[key.strip()] = ast.literal_eval(value.strip())
    return text, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cells", nargs="*", default=list(CELLS))
    args = parser.parse_args()
    steps = probe_steps(args.steps)
    print("| camera | per-vector cosine | step gradient cosine | error, step to step (cosine) |")
    print("|---|---|---|---|")
    for name, settings in map(parse_cell, args.cells):
        opu = OPU(steps[0][0].shape[1], 512, seed=0, **settings)
        opu(steps[0][0][:256])  # the first call sets the anchor and the exposure (as a training run's first step)
        fid = step_fidelity(opu, opu.ideal_matrix(), steps)
        vec = sum(fid.vector_cosine) / len(fid.vector_cosine)
        grads = ", ".join(f"{c:.3f}" for c in fid.gradient_cosine)
        errs = ", ".join(f"{c:.2f}" for c in fid.error_correlation)
        print(f"| {name} | {vec:.3f} | {grads} | {errs} |", flush=True)


if __name__ == "__main__":
    main()
