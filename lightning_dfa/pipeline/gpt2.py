"""Train a GPT-2 (HF ``GPT2LMHeadModel.from_config``) with layer-parallel DFA, one Fabric process per stage.

Usage::

    python -m lightning_dfa.pipeline.gpt2 --pipeline-stages 2 --microbatches 4 --steps 200
    python -m lightning_dfa.pipeline.gpt2 --pipeline-stages 0 ...     # the one-process FeedbackEngine reference
    python -m lightning_dfa.pipeline.gpt2 --config gpt2 --accelerator cuda

The data is a seeded synthetic Markov text (every rank builds the same); it prints and writes the validation
perplexity (``--out``/result.json). Dropout is off, so the pipeline and one process follow the same trajectory.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from lightning_dfa.feedback import DFAConfig, FeedbackEngine


def markov_text(vocab: int, tokens: int, seed: int) -> Tensor:
    """A token stream from a fixed random sparse Markov chain (each token has 3 likely successors): learnable."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=generator)
    stream = torch.empty(tokens, dtype=torch.long)
    stream[0] = 0
    choices = torch.randint(0, 3, (tokens,), generator=generator)
    noise = torch.rand(tokens, generator=generator) < 0.1
    random = torch.randint(0, vocab, (tokens,), generator=generator)
    for i in range(1, tokens):
        stream[i] = random[i] if noise[i] else successors[stream[i - 1], choices[i]]
    return stream


def batches(args: argparse.Namespace) -> tuple[list[Tensor], list[Tensor]]:
    """Train and validation batches of ``block_size + 1`` tokens (the same on every rank)."""
    block = args.block_size + 1
    count = (args.steps + args.val_batches) * args.batch_size
    blocks = markov_text(args.vocab_size, count * block, args.seed).view(count, block)
    train, val = blocks[: args.steps * args.batch_size], blocks[args.steps * args.batch_size :]
    return list(train.split(args.batch_size)), list(val.split(args.batch_size))


def gpt2(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(args.seed)
    config = GPT2Config(
        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_positions=args.block_size,
        vocab_size=args.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False,  # a head tied to the embeddings would span the first and last stages
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def dfa_config(args: argparse.Namespace) -> DFAConfig:
    return DFAConfig(projector=args.projector, seed=args.seed, lr_scale=args.lr_scale, nonfinite="skip")


def train_pipeline(fabric: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Every rank: its stage, the shared loop; the validation perplexity on every rank."""
    from lightning_dfa.pipeline.fabric import FabricPipeline

    model = gpt2(args).to(torch.float64 if args.double else torch.float32)
    pipe = FabricPipeline(fabric, model, lm_loss, args.microbatches, dfa_config(args), order=args.order,
                          timeout=args.timeout, stages=args.pipeline_stages)  # fmt: skip
    optimizer = pipe.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    train, val = batches(args)
    start = pipe.load(args.resume, optimizer)["step"] if args.resume else 0
    losses = []
    for step in range(start, len(train)):
        if args.out and step == args.save_at:
            pipe.save(Path(args.out) / "checkpoint", optimizer, step=step)
        losses.append(pipe.step(train[step][:, :-1], train[step][:, 1:], optimizer))
        if fabric.global_rank == 0 and (step + 1) % args.log_every == 0:
            print(f"step {step + 1}: train loss {sum(losses[-args.log_every :]) / args.log_every:.4f}", flush=True)
    val_loss = sum(pipe.evaluate(b[:, :-1], b[:, 1:]) for b in val) / len(val)
    if args.out and args.save_at is None:
        pipe.save(Path(args.out) / "checkpoint", optimizer, step=len(train))
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "train_loss": losses, "stages": pipe.stages}


def train_one_process(args: argparse.Namespace) -> dict[str, Any]:
    """The reference: the unsplit model, the one-process ``FeedbackEngine``, the same microbatches."""
    model = gpt2(args).to(torch.float64 if args.double else torch.float32)
    engine = FeedbackEngine(dfa_config(args)).attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    engine.scale_updates(optimizer)
    train, val = batches(args)
    losses = []
    for block in train:
        total = 0.0
        count = args.microbatches * args.replicas  # the replicas' microbatches, one after the other
        for part in block.chunk(count):
            loss = lm_loss(model(part[:, :-1]).logits, part[:, 1:])
            (loss / count).backward()
            total += float(loss.detach()) / count
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    with torch.no_grad():
        val_loss = sum(float(lm_loss(model(b[:, :-1]).logits, b[:, 1:])) for b in val) / len(val)
    return {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "train_loss": losses, "stages": 0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="a YAML file of these options, or gpt2 (the shipped recipe); flags override it")
    p.add_argument("--pipeline-stages", type=int, default=2, help="processes, one stage each; 0: one process")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel copies of the pipeline (processes: P x R)")
    p.add_argument("--microbatches", type=int, default=4, help="per replica")
    p.add_argument("--order", choices=["1f1b", "gpipe"], default="1f1b")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-head", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-scale", default="auto", type=lambda v: v if v == "auto" else float(v))
    p.add_argument("--projector", default="gaussian")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a stage waits for another before raising")
    p.add_argument("--double", action="store_true", help="float64 (exactness checks)")
    p.add_argument("--out", default="", help="a folder: result.json and the stages' checkpoints (out/checkpoint)")
    p.add_argument(
        "--save-at", type=int, default=None, help="save the checkpoint before this step (default: at the end)"
    )
    p.add_argument("--resume", default="", help="a checkpoint folder to resume from (out/checkpoint of a run)")
    return p


def config_path(value: str) -> Path:
    """A YAML path, or ``gpt2``: the recipe shipped beside this module."""
    if Path(value).exists():
        return Path(value)
    shipped = Path(__file__).with_name(f"{Path(value).name.removesuffix('.yaml')}.yaml")
    if shipped.exists():
        return shipped
    raise SystemExit(f"--config {value!r} is neither a file nor a shipped recipe (shipped: gpt2).")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    first, _ = p.parse_known_args(argv)
    if first.config:
        options = yaml.safe_load(config_path(first.config).read_text()) or {}
        unknown = sorted(set(options) - {a.dest for a in p._actions})
        if unknown:
            raise SystemExit(f"{first.config}: unknown options {unknown}")
        p.set_defaults(**options)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` say: ``pipeline_stages`` Fabric processes (``ddp_fork`` on the CPU), or one process."""
    if args.pipeline_stages == 0:
        return train_one_process(args)
    from lightning.fabric import Fabric

    strategy = "ddp_fork" if args.accelerator == "cpu" else "ddp"
    devices = args.pipeline_stages * args.replicas
    fabric = Fabric(accelerator=args.accelerator, devices=devices, strategy=strategy)
    results = fabric.launch(train_pipeline, args)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    result = run(args)
    if result is None:  # a forked rank's return does not reach the parent: only rank 0 here
        return
    print(f"validation perplexity {result['val_ppl']:.4f} ({args.pipeline_stages or 'one process'} stages)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps({**result, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
