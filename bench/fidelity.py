"""Step-level fidelity of the OPU emulator's camera: a synthetic probe, and the recipes' real batches.

    python bench/fidelity.py                                  # the probe's table: camera settings, one row each
    python bench/fidelity.py --steps 3 --cells default exposure=0.1
    python bench/fidelity.py --recipes quickstart vit-digits ddpm-digits    # real batches (~1 min per recipe)

The probe:
Errors: softmax (logits ``randn * 2.5``) minus one-hot, 1024 vectors of width 4096, a new batch per step; block
inputs ``relu(randn(1024, 128)) + 0.5``. ``OPU(4096, 512, seed=0)`` with each cell's settings; the reference is
``e @ opu.ideal_matrix()`` (same medium, no camera, no encoding). Prints, per cell, the mean per-vector cosine,
the cosine of the step's summed gradient ``F^T A`` (per step) and the step-to-step cosine of that gradient's error.

Real batches (``--recipes``): each recipe is trained for ``--warm-steps`` steps as its YAML says (DFA, Gaussian
projection), so that its errors and block activations are those of training, not of the initialisation. Then, on
``--steps`` training batches with the weights held, every feedback point's weight gradient (its columns of the
projection pushed through the block's own backward, summed over the batch: :func:`point_gradients`) is computed under
each cell's OPU and under that OPU's exact matrix ``ideal_matrix()`` (the same medium without camera and encoding),
with the same forward (dropout, diffusion noise). Printed per cell: the gradient cosine (mean over points and steps,
and the worst point's mean) and the step-to-step cosine of the gradient's error (mean and largest).
"""

from __future__ import annotations

import argparse
import ast
import statistics
import tempfile
import warnings

import torch

from lightning_dfa.callbacks.common import find_dfa
from lightning_dfa.cli import run
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.feedback.fidelity import point_gradients
from lightning_dfa.projectors import OPU
from lightning_dfa.projectors.fidelity import gradient_fidelity, step_fidelity

#: The settings before this study: exposure 0.2, no ADC dither, 64 blank frames, one anchor frame, fixed power.
FORMER = {"exposure": 0.2, "adc_dither": False, "blank_frames": 64, "frame_power": False, "anchor_frames": 1}
#: One step further: exposure 0.1, ADC dither and 4096 blank frames, still one anchor frame at a fixed power.
SECOND = {"frame_power": False, "anchor_frames": 1}

CELLS = {
    "camera=False": {"camera": False},
    "default": {},
    "former defaults (exposure 0.2, no ADC dither, blank_frames=64)": FORMER,
    "former, blank_frames=16384": {**FORMER, "blank_frames": 16384},
    "former, no noise (rounding only)": {**FORMER, "shot_noise": False, "read_noise": 0.0},
    "former, bit_depth=None (noise only)": {**FORMER, "bit_depth": None},
    "former, no noise, bit_depth=None (saturation only)": {
        **FORMER,
        "shot_noise": False,
        "read_noise": 0.0,
        "bit_depth": None,
    },
    "former, exposure=0.8": {**FORMER, "exposure": 0.8},
    "former, adc_dither": {**FORMER, "adc_dither": True},
    "exposure 0.1, ADC dither, blank_frames=4096 (fixed power, 1 anchor frame)": SECOND,
    "the same, 64 anchor frames": {**SECOND, "anchor_frames": 64},
    "the same, frame_power (1 anchor frame)": {**SECOND, "frame_power": True},
    "default, no ADC dither": {"adc_dither": False},
    "default, blank_frames=64": {"blank_frames": 64},
    "default, anchor_pixels=32": {"anchor_pixels": 32},
    "default, no noise (rounding only)": {"shot_noise": False, "read_noise": 0.0},
    "default, bit_depth=None (noise only)": {"bit_depth": None},
    "default, exposure=0.2": {"exposure": 0.2},
    "default, 12-bit camera": {"bit_depth": 12},
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


#: The cells measured on the recipes' real batches.
RECIPE_CELLS = (
    "camera=False",
    "default",
    "exposure 0.1, ADC dither, blank_frames=4096 (fixed power, 1 anchor frame)",
    "former defaults (exposure 0.2, no ADC dither, blank_frames=64)",
)


def warmed_up(recipe: str, steps: int, root: str):
    """The recipe's model, data and DFA engine after ``steps`` training steps of its own configuration."""
    args = ["fit", "--config", recipe, f"--trainer.max_steps={steps}", "--baselines=[]", "--trainer.logger=false"]
    args += ["--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=0", "--trainer.limit_test_batches=0"]
    cli = run(args)
    cli.model.trainer = None  # training_step's self.log() outside a Trainer is a no-op
    return cli.model, cli.datamodule, find_dfa(cli.trainer)


def training_loss(model, batch):
    return model.training_step(batch, 0)


def recipe_fidelity(recipe: str, cells: list[str], steps: int, warm_steps: int) -> list[str]:
    """Table rows ``| recipe | cell | gradient cosine | worst point | error step to step (mean, max) |``."""
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer, the OPU's tiling and coverage notes
        model, data, trained = warmed_up(recipe, warm_steps, root)
        batches = [batch for batch, _ in zip(data.train_dataloader(), range(steps))]
        rows = []
        for name, settings in map(parse_cell, cells):
            opu = FeedbackEngine(trained.config, projector={"class_path": "opu", "init_args": settings})
            measured = [point_gradients(opu, model, training_loss, b, seed=i) for i, b in enumerate(batches)]
            exact = FeedbackEngine(trained.config, projector=opu.projection.projector.ideal_matrix())
            reference = [point_gradients(exact, model, training_loss, b, seed=i) for i, b in enumerate(batches)]
            cosines, correlations = {}, {}
            for point in measured[0]:
                cos, corr = gradient_fidelity([g[point] for g in measured], [g[point] for g in reference])
                cosines[point], correlations[point] = statistics.mean(cos), corr
            worst = min(cosines.values())
            every = [c for corr in correlations.values() for c in corr]
            rows.append(
                f"| {recipe} | {name} | {statistics.mean(cosines.values()):.3f} | {worst:.3f} | "
                f"{statistics.mean(every):.2f}, {max(every):.2f} |"
            )
            print(rows[-1], flush=True)
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cells", nargs="*", default=None, help="cell names or key=value,... OPU settings")
    parser.add_argument("--recipes", nargs="*", default=None, help="measure on these recipes' real batches")
    parser.add_argument("--warm-steps", type=int, default=50, help="training steps before measuring (--recipes)")
    args = parser.parse_args()
    if args.recipes:
        print("| recipe | camera | gradient cosine (mean over points) | worst point | error step to step (mean, max) |")
        print("|---|---|---|---|---|")
        for recipe in args.recipes:
            recipe_fidelity(recipe, args.cells or list(RECIPE_CELLS), args.steps, args.warm_steps)
        return
    args.cells = args.cells or list(CELLS)
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
