"""DFA versus backprop: step time, peak memory and the projection's share, same model and batch, measured alternately.

    python bench/step.py                                          # CPU: tanh MLP, tiny GPT, GPT-2 small (reduced batch)
    python bench/step.py --cases gpt-small --projectors structured,opu --repeats 5
    python bench/step.py --device cuda --cases gpt-small,llama-1b --dtype bf16 --json bench/out/step-cuda.json

Every case builds one model and one AdamW optimizer. Each round runs a full training step (zero grad,
forward, loss, backward, optimizer step) once per variant: plain backprop, then DFA with each
projector (``FeedbackEngine`` attached before its step and detached after, outside the timing), in an
order rotated every round, so that a noisy machine slows every variant alike. Reported per variant:

- ``ms``: median step time; ``x BP``: median over rounds of (this step / the same round's backprop step).
- ``peak MB``: the largest amount of tensor memory live during the step above what was live when it
  started (after ``zero_grad(set_to_none=True)``: parameters, optimizer state and batch excluded;
  activations, gradients and every temporary included). On CUDA ``torch.cuda.max_memory_allocated``
  minus the allocation at the start; on the CPU the same quantity from the torch profiler's record of
  every allocation and free (``profile_memory=True``), in one extra, untimed step. Both count tensor
  bytes as allocated (no allocator caching, no Python objects), so they compare across devices.
- ``saved MB``: bytes of the activations autograd saves for backward (parameters excluded).
- ``proj ms`` and ``proj %``: the projector's own forward (timed by hooks; CUDA events on a GPU) and its
  share of the DFA step; ``fb %``: the whole feedback computation of the engine (non-finite check,
  projection, slicing) as a share of the step.
- ``OPU ms`` and ``OPU x BP``: the time an OPU would take for the same projection by the cost model
  (``lightning_dfa.projectors.cost.optical_cost``, ternary input: 4 frames of 0.5 ms per error
  vector), and the DFA step with that optical time in place of the measured projection, over backprop.

On the CPU, ``--threads`` (default 1) fixes torch's thread count: on a machine shared with other jobs a
single thread per process is steadier than two threads waiting on each other. The load average
before and after the run is printed and saved with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

import lightning_dfa
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.projectors.cost import optical_cost

RECIPES = Path(lightning_dfa.__file__).parent / "recipes"
#: ``wall``: elapsed time; ``cpu``: the process's CPU time (user + system), steadier on a shared CPU.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Case:
    """A model and batch to time: an MLP (``widths``) or a causal LM from a recipe (``recipe``)."""

    name: str
    projectors: tuple[str, ...]
    widths: tuple[int, ...] = ()
    classes: int = 10
    batch: int = 0
    recipe: str = ""
    cpu_batch: int = 0  # a reduced batch and sequence on the CPU (0: the recipe's)
    cpu_seq: int = 0


LM_PROJECTORS = ("gaussian", "structured", "opu")
CASES = {
    "digits-mlp": Case("digits-mlp", ("gaussian",), widths=(64, 256, 256, 256), batch=32),
    "mlp": Case("mlp", LM_PROJECTORS, widths=(2048,) * 5, batch=256),
    "gpt-tiny": Case("gpt-tiny", (*LM_PROJECTORS, "structured@transformer.ln_f"), recipe="quickstart"),
    "gpt-small": Case(
        "gpt-small", (*LM_PROJECTORS, "structured@transformer.ln_f"), recipe="gpt2-small", cpu_batch=2, cpu_seq=128
    ),
    "llama-1b": Case(
        "llama-1b", ("structured", "opu", "structured@model.norm"), recipe="llama-1b", cpu_batch=1, cpu_seq=64
    ),
}
DEFAULT_CASES = {"cpu": "mlp,gpt-tiny,gpt-small", "cuda": "mlp,gpt-tiny,gpt-small,llama-1b"}


# ---------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """Blocks of ``Linear + Tanh`` and a linear head: the DFA textbook case."""

    def __init__(self, widths: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def recipe_config(name: str) -> tuple[dict, int, int]:
    """The HF model config, batch size and sequence length of a recipe in ``lightning_dfa/recipes``."""
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    config = dict(recipe["model"]["init_args"]["config"])
    data = recipe["data"]["init_args"]
    config.setdefault("vocab_size", data.get("bpe_vocab_size"))
    for token in ("bos_token_id", "eos_token_id"):  # as the tokenizer would set them: inside the vocabulary
        config.setdefault(token, config["vocab_size"] - 1)
    return config, data["batch_size"], data["block_size"]


def build(case: Case, device: torch.device, batch: int | None, seq: int | None) -> dict:
    """The model (on ``device``), its batch, loss, the engine's settings and a description of the shape."""
    torch.manual_seed(0)
    if case.widths:
        model = MLP(case.widths, case.classes).to(device)
        x = torch.randn(batch or case.batch, case.widths[0], device=device)
        y = torch.randint(0, case.classes, (x.shape[0],), device=device)
        return dict(
            model=model,
            inputs=(x, y),
            loss=mlp_loss,
            points={"blocks": "blocks.*", "output": "head"},
            shape=f"batch {x.shape[0]}",
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    config, recipe_batch, recipe_seq = recipe_config(case.recipe)
    cpu = device.type == "cpu"
    batch = batch or (case.cpu_batch if cpu and case.cpu_batch else recipe_batch)
    seq = seq or (case.cpu_seq if cpu and case.cpu_seq else recipe_seq)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).to(device)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), device=device)
    shape = f"batch {batch} x {seq}"
    if (batch, seq) != (recipe_batch, recipe_seq):
        shape += f" (recipe {recipe_batch} x {recipe_seq})"
    return dict(
        model=model, inputs=(ids,), loss=causal_lm_loss, points={"blocks": "auto", "output": "lm_head"}, shape=shape
    )


def mlp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy as in ``CausalLM``: logits of ``ids[:, :-1]`` against ``ids[:, 1:]``."""
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Sums the intervals between :meth:`start` and :meth:`stop` (CUDA events on a GPU, wall time on the CPU)."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda, self.clock = device.type == "cuda", clock
        self.intervals: list = []
        self.begin = None

    def start(self) -> None:
        self.begin = self._mark()

    def stop(self) -> None:
        self.intervals.append((self.begin, self._mark()))

    def _mark(self):
        if not self.cuda:
            return self.clock()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pop_ms(self) -> float:
        """Total milliseconds of the intervals so far (then forgets them)."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self.intervals)
        else:
            total = 1000 * sum(b - a for a, b in self.intervals)
        self.intervals = []
        return total


@dataclass
class Variant:
    """Backprop (``engine=None``) or DFA with one projector, and what was measured of it."""

    name: str
    engine: FeedbackEngine | None
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    projection: list[float] = field(default_factory=list)
    feedback: list[float] = field(default_factory=list)
    rows: int = 0
    timers: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        if self.engine is None:
            yield
            return
        self.engine.attach(model)
        try:
            yield
        finally:
            self.engine.detach()

    def instrument(self, device: torch.device, clock: Callable[[], float]) -> None:
        """Time the projector's forward and the engine's whole feedback computation (after the first step)."""
        if self.engine is None or self.timers:
            return
        self.timers = {"projection": Timer(device, clock), "feedback": Timer(device, clock)}
        projector, timer = self.engine.projector, self.timers["projection"]

        def before(module, args):
            self.rows = args[0].shape[0]
            timer.start()

        projector.register_forward_pre_hook(before)
        projector.register_forward_hook(lambda *_: timer.stop())
        projection = self.engine.projection
        projection.gradients = timed(projection.gradients, self.timers["feedback"])


def timed(fn: Callable, timer: Timer) -> Callable:
    def wrapper(*args, **kwargs):
        timer.start()
        try:
            return fn(*args, **kwargs)
        finally:
            timer.stop()

    return wrapper


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(variant: Variant, step: Callable, setup: dict, device: torch.device, clock=time.perf_counter) -> float:
    """Seconds of one training step of ``variant`` by ``clock`` (zero_grad and engine attach/detach not included)."""
    setup["optimizer"].zero_grad(set_to_none=True)
    with variant.attached(setup["model"]):
        synchronize(device)
        start = clock()
        step()
        synchronize(device)
        return clock() - start


# ---------------------------------------------------------------------------------------------- memory
def peak_bytes(variant: Variant, step: Callable, setup: dict, device: torch.device) -> int:
    """Peak tensor memory of one step above the memory live at its start (see the module doc)."""
    setup["optimizer"].zero_grad(set_to_none=True)
    with variant.attached(setup["model"]):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base
        return profiled_peak(step)


def profiled_peak(fn: Callable) -> int:
    """The peak of the running sum of the profiler's allocation (+) and free (-) events while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def saved_bytes(variant: Variant, step: Callable, setup: dict) -> int:
    """Bytes of the activations autograd saves for backward during one step (parameters excluded)."""
    total, parameters = 0, {p.data_ptr() for p in setup["model"].parameters()}

    def pack(tensor):
        nonlocal total
        if tensor.data_ptr() not in parameters:
            total += tensor.numel() * tensor.element_size()
        return tensor

    setup["optimizer"].zero_grad(set_to_none=True)
    with variant.attached(setup["model"]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


# ---------------------------------------------------------------------------------------------- the benchmark
def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(setup: dict, device: torch.device, dtype: str) -> Callable[[], None]:
    model, loss_fn, inputs, optimizer = setup["model"], setup["loss"], setup["inputs"], setup["optimizer"]

    def step() -> None:
        with autocast(device, dtype):
            loss = loss_fn(model, *inputs)
        loss.backward()
        optimizer.step()

    return step


def run_rounds(variants: list[Variant], step: Callable, setup: dict, device: torch.device, args) -> None:
    """``args.repeats`` rounds, each one step of every variant, the order rotated each round."""
    for r in range(args.repeats):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.times.append(timed_step(variant, step, setup, device, CLOCKS[args.clock]))
            if variant.timers:
                variant.projection.append(variant.timers["projection"].pop_ms())
                variant.feedback.append(variant.timers["feedback"].pop_ms())
        for variant in variants:
            variant.ratios.append(variant.times[-1] / variants[0].times[-1])


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time, memory and projection share of backprop and of DFA with each projector on one case."""
    setup = build(case, device, args.batch, args.seq)
    setup["model"].train()
    setup["optimizer"] = torch.optim.AdamW(setup["model"].parameters(), lr=1e-4)
    step = make_step(setup, device, args.dtype)
    projectors = args.projectors.split(",") if args.projectors else case.projectors
    variants = [Variant("backprop", None)]
    variants += [dfa_variant(spec, setup["points"]) for spec in projectors]
    for variant in variants:  # warm up: builds the projectors and the optimizer state
        for _ in range(args.warmup):
            timed_step(variant, step, setup, device)
        variant.instrument(device, CLOCKS[args.clock])
    run_rounds(variants, step, setup, device, args)
    rows = [summarise(case, setup, v, device, args) for v in variants]
    for row, variant in zip(rows, variants):
        row["peak_MB"] = peak_bytes(variant, step, setup, device) / 2**20
        row["saved_MB"] = saved_bytes(variant, step, setup) / 2**20
        row["peak_ratio"] = row["peak_MB"] / rows[0]["peak_MB"] if "peak_MB" in rows[0] else 1.0
    if args.profile:
        for variant in variants:
            profile_step(variant, step, setup, device, case.name)
    return rows


def dfa_variant(spec: str, points: dict) -> Variant:
    """DFA with ``spec`` = ``projector`` or ``projector@output`` (another error point, e.g. ``transformer.ln_f``)."""
    projector, _, output = spec.partition("@")
    points = {**points, "output": output} if output else points
    return Variant(f"dfa:{spec}", FeedbackEngine(**points, projector=projector))


def summarise(case: Case, setup: dict, variant: Variant, device: torch.device, args: argparse.Namespace) -> dict:
    ms = 1000 * statistics.median(variant.times)
    row = {
        "case": case.name,
        "variant": variant.name,
        "shape": setup["shape"],
        "params": sum(p.numel() for p in setup["model"].parameters()),
        "device": str(device),
        "dtype": args.dtype,
        "ms": ms,
        "ratio": statistics.median(variant.ratios),
        "times_ms": [1000 * t for t in variant.times],
    }
    if variant.engine is not None:
        projector = variant.engine.projector
        projection = statistics.median(variant.projection)
        bp_ms = 1000 * statistics.median(r / q for r, q in zip(variant.times, variant.ratios))
        opu = optical_ms(projector, variant.rows)
        row |= {
            "projection_ms": projection,
            "projection_share": projection / ms,
            "feedback_share": statistics.median(variant.feedback) / ms,
            "rows": variant.rows,
            "d_e": projector.in_features,
            "d_fb": projector.out_features,
            "opu_ms": opu,
            "opu_ratio": (ms - projection + opu) / bp_ms,
        }
    return row


def optical_ms(projector: nn.Module, rows: int) -> float:
    """Milliseconds an OPU would take for ``rows`` projections by the cost model (the OPU emulator's own settings)."""
    d_e, d_fb = projector.in_features, projector.out_features
    encoding, bits = getattr(projector, "encoding", "ternary"), getattr(projector, "bits", 4)
    anchor = getattr(projector, "anchor_pixels", max(1, d_e // 4))
    return 1000 * optical_cost(rows, d_e, d_fb, encoding=encoding, bits=bits, anchor_pixels=anchor).time_s


def profile_step(variant: Variant, step: Callable, setup: dict, device: torch.device, name: str) -> None:
    """Print the operators that took the most time in one step of ``variant``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    setup["optimizer"].zero_grad(set_to_none=True)
    with variant.attached(setup["model"]), profile(activities=activities) as prof:
        step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{name} / {variant.name}")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


# ---------------------------------------------------------------------------------------------- output
COLUMNS = [  # key, title, width, format
    ("case", "case", 10, "{}"),
    ("variant", "variant", 24, "{}"),
    ("ms", "ms", 9, "{:.1f}"),
    ("ratio", "x BP", 6, "{:.2f}"),
    ("peak_MB", "peak MB", 9, "{:.1f}"),
    ("peak_ratio", "x BP", 6, "{:.2f}"),
    ("saved_MB", "saved MB", 9, "{:.1f}"),
    ("projection_ms", "proj ms", 8, "{:.1f}"),
    ("projection_share", "proj %", 7, "{:.1%}"),
    ("feedback_share", "fb %", 7, "{:.1%}"),
    ("opu_ms", "OPU ms", 9, "{:.1f}"),
    ("opu_ratio", "OPU x BP", 8, "{:.2f}"),
]


def print_table(rows: list[dict]) -> None:
    """The results as a fixed-width table, then each case's shape and size."""

    def line(cells: list[str]) -> str:
        return " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, (_, _, w, _)) in enumerate(zip(cells, COLUMNS)))

    print(line([title for _, title, _, _ in COLUMNS]))
    for row in rows:
        print(line([fmt.format(row[key]) if key in row else "" for key, _, _, fmt in COLUMNS]))
    for case, shape, params in dict.fromkeys((r["case"], r["shape"], r["params"]) for r in rows):
        print(f"  {case}: {shape}, {params / 1e6:.1f}M parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cases", help=f"comma-separated, from {sorted(CASES)} (default: {DEFAULT_CASES})")
    parser.add_argument(
        "--projectors",
        help="comma-separated projector names for every case (default: per case); name@module also moves the "
        "error point, e.g. structured@transformer.ln_f (the last hidden state instead of the logits)",
    )
    parser.add_argument("--batch", type=int, help="batch size for every case (default: per case)")
    parser.add_argument("--seq", type=int, help="sequence length for the language models (default: per case)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, as bf16-mixed")
    parser.add_argument("--repeats", type=int, default=10, help="rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), help="cpu (default on the CPU) or wall (default on GPUs)")
    parser.add_argument("--profile", action="store_true", help="also print the top operators of one step each")
    parser.add_argument("--json", default="bench/out/step.json", help="where to write the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name in (args.cases or DEFAULT_CASES.get(device.type, DEFAULT_CASES["cuda"])).split(","):
        rows += measure(CASES[name], args, device)
    meta = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else os.uname().machine,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "repeats": args.repeats,
        "clock": args.clock,
    }
    print_table(rows)
    before, after = load_before[0], meta["load_after"][0]
    print(f"clock {args.clock}, threads {meta['threads']}, load average before {before:.2f}, after {after:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
