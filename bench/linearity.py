"""Linearity error of the OPU emulator versus camera bit depth and noise; writes docs/img/linearity.png.

The linearity error is ``|y - x_enc @ W| / |x_enc @ W|``: the distance between the emulator's output
and the exact linear projection of its (ternary-encoded) input, so it measures the camera and the
retrieval alone; the encoding's own error is printed beside it.

    python bench/linearity.py                       # d_e=256 -> d_fb=2048, 64 Gaussian error vectors
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from lightning_dfa.projectors import OPU, encode

BIT_DEPTHS = [2, 3, 4, 5, 6, 8, 10, 12, 16]
NOISE = {
    "no noise, exposure 0.05": {"shot_noise": False, "read_noise": 0.0, "exposure": 0.05},
    "no noise": {"shot_noise": False, "read_noise": 0.0},
    "read noise 5 e-": {"shot_noise": False, "read_noise": 5.0},
    "shot + read 5 e- (default)": {"shot_noise": True, "read_noise": 5.0},
    "shot + read 20 e-": {"shot_noise": True, "read_noise": 20.0},
}


def linearity_error(opu: OPU, error: torch.Tensor) -> float:
    reference = encode(error, opu.encoding, threshold=opu.threshold, bits=opu.bits).decode() @ opu.ideal_matrix()
    return float((opu(error) - reference).norm() / reference.norm())


def sweep(d_e: int, d_fb: int, rows: int, seed: int) -> dict:
    error = torch.randn(rows, d_e, generator=torch.Generator().manual_seed(seed))
    table = {}
    for name, noise in NOISE.items():
        table[name] = {
            str(b): linearity_error(OPU(d_e, d_fb, seed=seed, bit_depth=b, **noise), error) for b in [*BIT_DEPTHS, None]
        }
    ideal = OPU(d_e, d_fb, seed=seed, camera=False)
    table["no camera"] = {"None": linearity_error(ideal, error)}
    ideal(error)
    table["ternary encoding error"] = ideal.stats["encoding_error"]
    return table


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in NOISE:
        ax.semilogy(BIT_DEPTHS, [table[name][str(b)] for b in BIT_DEPTHS], marker="o", label=name)
    ax.set_xlabel("camera bit depth")
    ax.set_ylabel("linearity error |y - x W| / |x W|")
    ax.set_title("OPU emulator: retrieved projection vs exact (ternary input)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-e", type=int, default=256)
    parser.add_argument("--d-fb", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img" / "linearity.png"))
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # saturation warnings: counted in the table instead
        table = sweep(args.d_e, args.d_fb, args.rows, args.seed)
    print(f"{'bit depth':<28}" + "".join(f"{b!s:>8}" for b in [*BIT_DEPTHS, None]))
    for name in NOISE:
        print(f"{name:<28}" + "".join(f"{table[name][str(b)]:>8.4f}" for b in [*BIT_DEPTHS, None]))
    print(f"no camera: {table['no camera']['None']:.2e}; ternary encoding error: {table['ternary encoding error']:.3f}")
    print(json.dumps(table))
    plot(table, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
