"""Time and peak memory of one feedback projection for each projector kind.

For N error rows and each (d_e, d_fb) it prints a table and JSON: seconds per projection (median of
--repeats after --warmup calls), peak extra memory during the call, memory kept between calls,
the time ratio against the dense Gaussian measured in the same run (when its matrix fits in half of
the free memory; otherwise dense is skipped and said so), and "equivalent dense TeraOPS",
2 N d_e d_fb / time.

Peak extra memory: on CUDA, torch.cuda.max_memory_allocated() during the call minus what was
allocated before it. On CPU, a thread samples the process's resident set size (/proc/self/statm)
every millisecond during the call; the peak minus the RSS before the call is reported (large
tensors are mmap-ed and returned to the OS when freed, so RSS follows them; peaks shorter than a
millisecond can be missed).

    python bench/projectors.py                                   # all sizes, all kinds (slow on a CPU)
    python bench/projectors.py --sizes 512x6144,4096x49152 --kinds gaussian,seeded,structured,opu
    python bench/projectors.py --device cuda --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

from lightning_dfa.projectors import build_projector, equivalent_teraops
from lightning_dfa.projectors.cost import time_call

SIZES = "512x6144,4096x49152,50257x49152"
KINDS = "gaussian,seeded,structured,opu"


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or MemAvailable from /proc/meminfo."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory above the starting point while ``fn()`` runs (method: module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return max(peak[0], rss_bytes()) - base


def stored_bytes(projector: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in projector.buffers())


def parse_kind(kind: str) -> dict:
    """``"seeded:generator=device"`` -> ``{"class_path": "seeded", "init_args": {"generator": "device"}}``."""
    name, _, options = kind.partition(":")
    args = dict(option.split("=", 1) for option in options.split(";") if option)
    return {"class_path": name, "init_args": {k: int(v) if v.isdigit() else v for k, v in args.items()}}


def bench_one(kind: str, rows: int, d_e: int, d_fb: int, device: torch.device, repeats: int, warmup: int) -> dict:
    projector = build_projector(parse_kind(kind), d_e, d_fb, seed=0).to(device)
    error = torch.randn(rows, d_e, device=device)
    with torch.no_grad():
        seconds = time_call(lambda: projector(error), device, repeats, warmup)
        peak = peak_extra_bytes(lambda: projector(error), device)
    return {
        "kind": kind,
        "rows": rows,
        "d_e": d_e,
        "d_fb": d_fb,
        "device": str(device),
        "seconds": seconds,
        "peak_extra_MB": peak / 2**20,
        "stored_MB": stored_bytes(projector) / 2**20,
        "output_MB": rows * d_fb * 4 / 2**20,
        "dense_matrix_MB": d_e * d_fb * 4 / 2**20,
        "equivalent_TOPS": equivalent_teraops(rows, d_e, d_fb, seconds),
    }


def run(sizes: list[tuple[int, int]], kinds: list[str], rows: int, device: torch.device, repeats: int, warmup: int):
    results = []
    for d_e, d_fb in sizes:
        dense_fits = d_e * d_fb * 4 * 3 < free_bytes(device) // 2  # matrix, its float32 draw, a copy
        dense = None
        for kind in kinds:
            if kind == "gaussian" and not dense_fits:
                print(f"# {d_e}x{d_fb}: dense Gaussian skipped ({d_e * d_fb * 4 / 2**30:.1f} GiB does not fit)")
                continue
            result = bench_one(kind, rows, d_e, d_fb, device, repeats, warmup)
            if kind == "gaussian":
                dense = result
            result["x_dense_time"] = result["seconds"] / dense["seconds"] if dense else None
            results.append(result)
            print(row(result), flush=True)
    return results


HEADER = f"{'kind':<11}{'d_e x d_fb':>14}{'seconds':>10}{'x dense':>9}{'peak MB':>10}{'kept MB':>9}{'eq. TOPS':>10}"


def row(r: dict) -> str:
    ratio = f"{r['x_dense_time']:.2f}" if r["x_dense_time"] is not None else "-"
    return (
        f"{r['kind']:<11}{str(r['d_e']) + 'x' + str(r['d_fb']):>14}{r['seconds']:>10.3f}{ratio:>9}"
        f"{r['peak_extra_MB']:>10.0f}{r['stored_MB']:>9.1f}{r['equivalent_TOPS']:>10.3f}"
    )


def check_devices(device: torch.device) -> None:
    """Print whether each seeded kind gives the same matrix and feedback on the CPU and on ``device``."""
    from lightning_dfa.projectors import OPU

    makers = {
        "seeded": lambda **kw: build_projector("seeded", 3000, 5000, seed=3),
        "structured": lambda **kw: build_projector("structured", 3000, 5000, seed=3),
        "opu (ideal)": lambda **kw: OPU(3000, 5000, seed=3, camera=False, encoding=None),
    }
    x = torch.randn(64, 3000)
    for name, make in makers.items():
        here, there = make(), make().to(device)
        matrix = here.ideal_matrix if isinstance(here, OPU) else here.materialize
        other = there.ideal_matrix if isinstance(there, OPU) else there.materialize
        a, b = here(x), there(x.to(device)).cpu()
        print(
            f"# {name}: CPU and {device} matrices equal: {torch.equal(matrix(), other().cpu())}; "
            f"feedback relative difference {float((a - b).norm() / a.norm()):.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=SIZES, help="comma-separated d_e x d_fb, e.g. 512x6144")
    parser.add_argument("--kinds", default=KINDS, help="comma-separated; settings after ':', e.g. seeded:tile=8192")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--check-devices", action="store_true", help="first compare CPU and --device matrices")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(
        f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else os.cpu_count()} "
        f"{'' if device.type == 'cuda' else 'CPU cores, ' + str(torch.get_num_threads()) + ' threads'}), "
        f"N={args.rows}, repeats={args.repeats}, torch {torch.__version__}"
    )
    if args.check_devices:
        check_devices(device)
    print(HEADER)
    results = run(sizes, args.kinds.split(","), args.rows, device, args.repeats, args.warmup)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)


if __name__ == "__main__":
    main()
