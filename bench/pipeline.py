"""Layer-parallel DFA against torch's backprop pipeline schedules: sleep mode over real gloo, and an event model.

    python bench/pipeline.py                          # sleep mode at P = 2 (M = 2, 4, 8), event model at P = 4, 8
    python bench/pipeline.py --t-forward 0.02 --steps 6 --json bench/out/pipeline-20ms.json
    python bench/pipeline.py --compute real --device cuda --stages 4 --width 4096 --rows 512   # one GPU per stage

**Sleep mode.** On a shared CPU compute cannot be timed beside other work, so each stage's forward sleeps ``T_F`` and
its backward ``T_B = 2 T_F`` (a custom autograd Function), and everything else is real: torch's ``PipelineStage``,
the activations over gloo between two processes, the DFA error broadcast, torch's ``ScheduleGPipe`` and
``Schedule1F1B`` (backprop: gradients sent back) on the same split and microbatches. Reported: the median step
time of ``--steps`` steps (after one warm-up step) and its ratio to the DFA model ``(P-1) T_F + M (T_F + T_B)``
and to backprop's ``(P-1 + M) (T_F + T_B)``; bytes sent per step, counted at ``dist.isend`` and
``dist.broadcast``. Sleeps make the timing independent of the machine's load, not of its scheduler: a figure
within a few percent of the model is what this can show.

**Real compute** (``--compute real``): blocks of ``Linear + GELU`` (``--width``, ``--blocks-per-stage``), one GPU
per stage over NCCL with ``--device cuda``; step times against torch's 1F1B. On a shared CPU these times mean
little, and no GPU run has been made.

**Event model.** The same schedules as dependency graphs, ``T_F = 1``, ``T_B = 2``, no communication time: each
stage runs its ops in its schedule's order, an op starting when its inputs exist. DFA: ``B(s, i)`` needs only the
last stage's ``F(P-1, i)`` (the error), never ``B(s+1, i)``. ZB-H1 is its authors' closed form (Qi et al. 2023),
not simulated: bubble ``(P-1) (T_F + T_B_input - T_W)`` with the backward split in equal halves. Reported:
step time in units of ``T_F``, the bubble fraction ``1 - busy / (P x step)`` and the most microbatches whose
activations a stage holds at once (stash).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH, CLASSES, ROWS = 64, 16, 4  # one microbatch: ROWS x WIDTH float32 activations, ROWS x CLASSES errors
SLEPT: dict[str, list[float]] = {"F": [], "B": []}  # how long each sleep really took (a loaded machine oversleeps)


def nap(seconds: float, kind: str) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    SLEPT[kind].append(time.perf_counter() - start)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        nap(ctx.seconds, "B")
        return grad, None


class SleepBlock(nn.Module):
    """A block whose forward takes ``t_forward`` seconds and whose backward ``t_backward``."""

    def __init__(self, t_forward: float, t_backward: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(WIDTH))
        self.t_forward, self.t_backward = t_forward, t_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nap(self.t_forward, "F")
        return _Sleep.apply(x * self.scale, self.t_backward)


class PlainStage(nn.Module):
    """A stage's modules as plain backprop, for torch's own schedules."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage.points:
            x = self.stage.get_submodule(name)(x)
        return self.stage.chain.head(self.stage, x) if self.stage.is_last else x


class Bytes:
    """Bytes this process sends point to point (isend) and broadcasts as root."""

    def __init__(self) -> None:
        self.p2p = self.broadcast = 0
        self.on = False
        import torch.distributed.distributed_c10d as c10d

        isend, broadcast = c10d.isend, c10d.broadcast

        def counted_isend(tensor, *args, **kwargs):
            self.p2p += tensor.nbytes * self.on
            return isend(tensor, *args, **kwargs)

        def counted_broadcast(tensor, src=None, *args, **kwargs):
            if self.on and src == dist.get_rank():
                self.broadcast += tensor.nbytes
            return broadcast(tensor, src, *args, **kwargs)

        for module in (c10d, dist):
            module.isend, module.broadcast = counted_isend, counted_broadcast


def sleep_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from lightning_dfa.feedback import DFAConfig
    from lightning_dfa.pipeline import DFASchedule, pipeline_groups, split_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    counter = Bytes()
    t_f, real = args.t_forward, args.compute == "real"
    blocks = world * (args.blocks_per_stage if real else 1)
    width = args.width if real else WIDTH
    rows = args.rows if real else ROWS
    config = DFAConfig(blocks=[str(i) for i in range(blocks)], output=str(blocks), projector=args.projector,
                       lr_scale=1.0)  # fmt: skip
    results = []
    for microbatches in args.microbatches:
        for kind in ("dfa-1f1b", "dfa-gpipe", "torch-gpipe", "torch-1f1b"):
            groups = pipeline_groups(timeout=120)
            torch.manual_seed(0)
            if real:
                layers = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(blocks)]
            else:
                layers = [SleepBlock(t_f, 2 * t_f) for _ in range(blocks)]
            model = nn.Sequential(*layers, nn.Linear(width, CLASSES))
            module = split_model(model, world, rank, config).to(device)
            loss = nn.functional.cross_entropy
            if kind.startswith("dfa"):
                stage = PipelineStage(module, rank, world, device, group=groups.p2p)
                schedule = DFASchedule(stage, microbatches, loss, config, groups, order=kind.split("-")[1])
            else:
                stage = PipelineStage(PlainStage(module), rank, world, device, group=groups.p2p)
                schedule = (ScheduleGPipe if kind == "torch-gpipe" else Schedule1F1B)(stage, microbatches, loss)
            x = torch.randn(rows * microbatches, width, device=device)
            y = torch.randint(0, CLASSES, (rows * microbatches,), device=device)
            times = []
            SLEPT["F"].clear(), SLEPT["B"].clear()
            for step in range(args.steps + 1):
                dist.barrier(groups.error)
                counter.on, start = step == 1, time.perf_counter()
                schedule.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dist.barrier(groups.error)
                times.append(time.perf_counter() - start)
                counter.on = False
                for param in module.parameters():
                    param.grad = None
            results.append({"kind": kind, "M": microbatches, "seconds": statistics.median(times[1:]),
                            "p2p_bytes": counter.p2p, "broadcast_bytes": counter.broadcast,
                            "t_f": statistics.mean(SLEPT["F"] or [t_f]),
                            "t_b": statistics.mean(SLEPT["B"] or [2 * t_f])})  # fmt: skip
            counter.p2p = counter.broadcast = 0
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def sleep_mode(args: argparse.Namespace) -> list[dict]:
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tempfile.mkdtemp()
    stages = args.stages
    method = "spawn" if args.device == "cuda" else "fork"
    mp.start_processes(sleep_worker, args=(stages, port, args, out), nprocs=stages, start_method=method, join=True)
    ranks = [torch.load(f"{out}/{rank}.pt") for rank in range(stages)]
    rows = []
    t_f, t_b = args.t_forward, 2 * args.t_forward
    for first, *_, last in zip(*ranks):
        m = first["M"]
        dfa_model = (stages - 1) * t_f + m * (t_f + t_b)
        bp_model = (stages - 1 + m) * (t_f + t_b)
        slept_f, slept_b = (first["t_f"] + last["t_f"]) / 2, (first["t_b"] + last["t_b"]) / 2  # the sleeps as slept
        slept_model = (stages - 1) * slept_f + m * (slept_f + slept_b)
        sent = {key: sum(rank_rows[len(rows)][key] for rank_rows in ranks) for key in ("p2p_bytes", "broadcast_bytes")}
        ratios = {"x_dfa_model": first["seconds"] / dfa_model, "x_bp_model": first["seconds"] / bp_model,
                  "x_dfa_model_slept": first["seconds"] / slept_model, "oversleep": slept_f / t_f - 1}  # fmt: skip
        rows.append({**first, **sent, **ratios})
    return rows


# ---------------------------------------------------------------------------------------------------- event model
def orders(kind: str, stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    if kind.endswith("gpipe"):
        return [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]
    warmup = min(microbatches, stages - stage)
    ops = [("F", i) for i in range(warmup)]
    for i in range(microbatches):
        ops.append(("B", i))
        if warmup + i < microbatches:
            ops.append(("F", warmup + i))
    return ops


def simulate(kind: str, stages: int, microbatches: int, t_f: float = 1.0, t_b: float = 2.0) -> dict:
    """Step time, bubble fraction and stash of one schedule as a dependency graph (no communication time)."""
    if kind == "zb-h1":
        return _zero_bubble(stages, microbatches, t_f, t_b)
    done: dict[tuple[str, int, int], float] = {}
    plans = [orders(kind, stages, microbatches, s) for s in range(stages)]
    clock, position, stash, held = [0.0] * stages, [0] * stages, [0] * stages, [0] * stages
    dfa = kind.startswith("dfa")
    while any(position[s] < len(plans[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if position[s] == len(plans[s]):
                continue
            op, i = plans[s][position[s]]
            if op == "F":
                needs = [("F", s - 1, i)] if s > 0 else []
            else:
                needs = [("F", stages - 1, i)] if dfa else ([("B", s + 1, i)] if s < stages - 1 else [("F", s, i)])
                needs.append(("F", s, i))
            if not all(n in done for n in needs):
                continue
            start = max([clock[s], *(done[n] for n in needs)])
            clock[s] = start + (t_f if op == "F" else t_b)
            done[(op, s, i)] = clock[s]
            held[s] += 1 if op == "F" else -1
            stash[s] = max(stash[s], held[s])
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{kind}: the schedule deadlocks")
    step = max(clock)
    return {"step": step, "bubble": 1 - microbatches * (t_f + t_b) / step, "stash": max(stash)}


def _zero_bubble(stages: int, microbatches: int, t_f: float, t_b: float) -> dict:
    """ZB-H1 by its authors' own count (Qi et al. 2023, sec. 3): the backward split into input (``B``) and weight
    (``W``) halves of ``t_b / 2``, bubble ``(P-1) (T_F + T_B_input - T_W)``, stash as 1F1B's."""
    step = microbatches * (t_f + t_b) + (stages - 1) * (t_f + t_b / 2 - t_b / 2)
    return {"step": step, "bubble": 1 - microbatches * (t_f + t_b) / step, "stash": stages}


def event_table(stage_counts: list[int], microbatch_counts: list[int]) -> list[dict]:
    rows = []
    for stages in stage_counts:
        for m in microbatch_counts:
            row = {"P": stages, "M": m}
            for kind in ("dfa-1f1b", "dfa-gpipe", "torch-1f1b", "zb-h1"):
                row[kind] = simulate(kind, stages, m)
            rows.append(row)
    return rows


def _print_sleep(rows: list[dict]) -> None:
    print("| schedule | M | step ms | / DFA model | / DFA model, sleeps as slept | / backprop model | oversleep "
          "| p2p bytes/step | error bcast bytes/step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['M']} | {r['seconds'] * 1e3:.1f} | {r['x_dfa_model']:.3f} | "
              f"{r['x_dfa_model_slept']:.3f} | {r['x_bp_model']:.3f} | {r['oversleep']:+.1%} | {r['p2p_bytes']} | "
              f"{r['broadcast_bytes']} |")  # fmt: skip


def _print_real(rows: list[dict]) -> None:
    print("| schedule | M | step ms | / torch 1F1B | p2p bytes/step | error bcast bytes/step |")
    print("|---|---|---|---|---|---|")
    reference = {r["M"]: r["seconds"] for r in rows if r["kind"] == "torch-1f1b"}
    for r in rows:
        print(f"| {r['kind']} | {r['M']} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / reference[r['M']]:.3f} | "
              f"{r['p2p_bytes']} | {r['broadcast_bytes']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t-forward", type=float, default=0.05, help="seconds of one stage's forward (T_B = 2 T_F)")
    parser.add_argument("--microbatches", type=lambda v: [int(m) for m in v.split(",")], default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--projector", default="gaussian", help="the DFA projector (its compute is real, not slept)")
    parser.add_argument("--no-sleep", action="store_true", help="the event model only")
    parser.add_argument(
        "--compute",
        choices=["sleep", "real"],
        default="sleep",
        help="real: Linear+GELU blocks instead of sleeps (meaningful on GPUs: --device cuda)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per stage, NCCL")
    parser.add_argument("--stages", type=int, default=2, help="processes (one stage each); on cuda at most the GPUs")
    parser.add_argument("--blocks-per-stage", type=int, default=2, help="real compute: blocks on each stage")
    parser.add_argument("--width", type=int, default=1024, help="real compute: block width")
    parser.add_argument("--rows", type=int, default=64, help="real compute: rows per microbatch")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    results: dict = {"load_before": os.getloadavg()}
    if not args.no_sleep:
        results["sleep"] = sleep_mode(args)
        what = "sleep mode" if args.compute == "sleep" else f"real compute (width {args.width}, {args.rows} rows)"
        print(f"{what}, P = {args.stages} on {args.device}, T_F = {args.t_forward * 1e3:.0f} ms (sleep mode), "
              f"T_B = 2 T_F; median of {args.steps}")  # fmt: skip
        if args.compute == "real":
            _print_real(results["sleep"])
        else:
            _print_sleep(results["sleep"])
    results["events"] = event_table([4, 8], [8, 16, 32])
    print("\nevent model, T_F = 1, T_B = 2: step (bubble fraction, most microbatches stashed by a stage)")
    print("| P | M | DFA 1F1B order | DFA GPipe order | backprop 1F1B | ZB-H1 |")
    print("|---|---|---|---|---|---|")
    for r in results["events"]:
        cells = [f"{r[k]['step']:.0f} ({r[k]['bubble']:.2f}, {r[k]['stash']})"
                 for k in ("dfa-1f1b", "dfa-gpipe", "torch-1f1b", "zb-h1")]  # fmt: skip
        print(f"| {r['P']} | {r['M']} | " + " | ".join(cells) + " |")
    results["load_after"] = os.getloadavg()
    print(f"\nload average before {results['load_before'][0]:.2f}, after {results['load_after'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
