"""Held-out families: the plugin's defaults on models the learning study never saw, written as a user would.

Llama-style causal LM on pydoc text, a GPT written from scratch in plain PyTorch (nanoGPT-style) and the same size
of GPT-2 through HuggingFace on the same text, a BERT-style encoder classifying digits read as tokens, torchvision's
ResNet-18 on digits; ``gpt-*`` families change one detail of the from-scratch GPT (see ``GPT_CELLS``).

    python bench/heldout.py                                   # 5 families x {dfa, frozen, backprop} x seeds 0 1 2
    python bench/heldout.py --families resnet --seeds 0       # one cell
    python bench/heldout.py --families gpt-plain --methods "blocks=[model.layers.*.attn,model.layers.*.mlp]" ramp=150
                                                              # DFA with settings changed; ramp=/hold=: ScaleSchedule
    python bench/heldout.py --table-only                      # the table from the saved runs

Each family is a plain LightningModule: AdamW over ``self.parameters()``, a warmup, no DFA settings and no
``configure_dfa()``. The three methods differ only in the Trainer's strategy: ``strategy="dfa"`` (the plugin's
defaults: ``blocks="auto"``, the automatic error point, ``lr_scale``), the same-pipeline frozen-blocks control
(``DFAStrategy(mode="frozen")``) and plain backprop (Lightning's default strategy). Every run is one process
(one CPU thread); finished runs are kept under ``--root`` and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn

#: Text sizes shared by the two language families: BPE of 2,048 on Python's pydoc topics, 16 x 64 tokens a step.
TEXT = {"source": "pydoc", "bpe_vocab_size": 2048, "block_size": 64, "batch_size": 16}


class UserModule(pl.LightningModule):
    """What the three families share, as any user's module has it: AdamW over all parameters, linear warmup."""

    def __init__(self, lr: float = 1e-3, warmup: int = 30) -> None:  # the optimizer reads self.lr
        super().__init__()
        self.lr, self.warmup = lr, warmup

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch, train=False), prog_bar=True)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch, train=True)
        self.log("train/loss", loss)
        return loss


class LlamaLM(UserModule):
    """A Llama-style causal LM (RMSNorm, SwiGLU, rotary; untied embeddings, as Llama ships)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        self.model = LlamaForCausalLM(config)

    def loss(self, ids, train):
        return self.model(input_ids=ids, labels=ids).loss


class ScratchGPT(nn.Module):
    """A GPT as one writes it from scratch: token and position embeddings, pre-LayerNorm blocks in a ``ModuleList``,
    a final LayerNorm and a bias-free head sharing the token embedding's matrix.

    ``init="gpt2"``: every weight N(0, 0.02), the residual projections N(0, 0.02 / sqrt(2 layers)); ``"plain"``:
    the same without the residual scaling; ``"torch"``: PyTorch's own defaults (N(0, 1) embeddings).
    """

    def __init__(self, vocab, width=128, layers=4, heads=4, context=64, dropout=0.0, tied=True, init="gpt2"):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if init != "torch":
            for name, param in self.named_parameters():
                if param.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * layers) if init == "gpt2" and name.endswith("out.weight") else 0.02
                    nn.init.normal_(param, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(param)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        x = self.drop(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class Block(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x)); each sublayer ends in a projection named ``out``."""

    def __init__(self, width, heads, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential()
        self.mlp.add_module("up", nn.Linear(width, 4 * width))
        self.mlp.add_module("act", nn.GELU(approximate="tanh"))
        self.mlp.add_module("out", nn.Linear(4 * width, width))
        self.mlp.add_module("drop", nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SelfAttention(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.drop(self.out(y.transpose(1, 2).reshape(b, t, c)))


class GPTLM(UserModule):
    """The from-scratch GPT (``ScratchGPT``) or HuggingFace's GPT-2 of the same size (``hf=True``) on the text."""

    def __init__(self, vocab_size: int, hf: bool = False, **details) -> None:
        super().__init__()
        if hf:
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(vocab_size=vocab_size, n_positions=TEXT["block_size"], n_embd=128, n_layer=4, n_head=4)
            self.model = GPT2LMHeadModel(config)
        else:
            self.model = ScratchGPT(vocab_size, context=TEXT["block_size"], **details)
        self.hf = hf

    def loss(self, ids, train):
        inputs, targets = ids[:, :-1], ids[:, 1:]  # blocks of block_size + 1 tokens
        logits = self.model(input_ids=inputs).logits if self.hf else self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class BertDigits(UserModule):
    """A BERT-style encoder classifying 8x8 digits read as 64 tokens (the pixel intensities 0-16), CLS first."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=18,  # 17 intensities and the CLS token
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=72,
            num_labels=10,
        )
        self.model = BertForSequenceClassification(config)

    def loss(self, batch, train):
        x, y = batch
        tokens = (x.flatten(1) * 16).round().long()  # the data module gives intensities in [0, 1]
        ids = torch.cat([torch.full_like(tokens[:, :1], 17), tokens], dim=1)
        return classification_loss(self, self.model(input_ids=ids).logits, y, train)


class ResNetDigits(UserModule):
    """torchvision's ResNet-18 for 8x8 one-channel digits: a 3x3 stem without max-pooling."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.model = resnet18(num_classes=10)
        self.model.conv1 = nn.Conv2d(1, 64, kernel_size=3, padding=1, bias=False)
        self.model.maxpool = nn.Identity()

    def loss(self, batch, train):
        x, y = batch
        return classification_loss(self, self.model(x), y, train)


def classification_loss(module: pl.LightningModule, logits, labels, train: bool):
    if not train:
        module.log("val/error", (logits.argmax(-1) != labels).float().mean())
    return F.cross_entropy(logits, labels)


def text_data():
    from lightning_dfa.data import TextDataModule

    return TextDataModule(**TEXT)


def digits_data():
    from lightning_dfa.data import ImageDataModule

    return ImageDataModule(source="digits", batch_size=32)


#: family -> (data module, model from the data module, trainer budget, metrics reported)
FAMILIES = {
    "llama": (text_data, lambda dm: LlamaLM(dm.vocab_size), {"max_steps": 300, "val_check_interval": 100}, "val/ppl"),
    "gpt": (text_data, lambda dm: GPTLM(dm.vocab_size), {"max_steps": 300, "val_check_interval": 100}, "val/ppl"),
    "gpt2": (
        text_data,
        lambda dm: GPTLM(dm.vocab_size, hf=True),
        {"max_steps": 300, "val_check_interval": 100},
        "val/ppl",
    ),
    "bert": (digits_data, lambda dm: BertDigits(), {"max_epochs": 8}, "val/error"),
    "resnet": (digits_data, lambda dm: ResNetDigits(), {"max_epochs": 8}, "val/error"),
}
#: One detail of the from-scratch GPT changed (the diagnosis against GPT-2); not run unless named in --families.
GPT_CELLS = {
    "gpt-plain": {"init": "plain"},  # residual projections not scaled
    "gpt-torch": {"init": "torch"},  # PyTorch's default initialisation
    "gpt-untied": {"tied": False},
    "gpt-dropout": {"dropout": 0.1},  # GPT-2's default dropout
}
for _cell, _details in GPT_CELLS.items():
    FAMILIES[_cell] = (text_data, lambda dm, d=_details: GPTLM(dm.vocab_size, **d), *FAMILIES["gpt"][2:])
DEFAULT_FAMILIES = [f for f in FAMILIES if f not in GPT_CELLS]
METHODS = ("dfa", "frozen", "backprop")

#: The users' AdamW learning rate (``--lrs`` tries others: each method is compared at its own best).
LR = 1e-3


class ScaleSchedule(pl.Callback):
    """The points' ``lr_scale="auto"`` share held at 0 for ``hold`` steps, then ramped up over ``ramp`` steps (the
    plugin's ``lr_scale_ramp`` is the ``hold=0`` case); a lever measured here."""

    def __init__(self, hold: int = 0, ramp: int = 0) -> None:
        self.hold, self.ramp, self.base = hold, ramp, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from lightning_dfa.callbacks.common import find_dfa
        from lightning_dfa.feedback.update_scale import ramp_factor

        engine = find_dfa(trainer)
        self.base = self.base if self.base is not None else engine.points_lr_scale
        if trainer.global_step < self.hold:
            factor = 0.0
        else:
            factor = ramp_factor(trainer.global_step - self.hold, self.ramp)
        engine.points_lr_scale = self.base * factor
        for scaled in engine._scaled_updates:
            scaled.rescale()


class DepthScale(pl.Callback):
    """``lr_scale`` by depth, a lever measured here: block ``i`` of ``n`` (from the input) moves ``profile(i)`` x the
    step the plugin gave it, with the profile's mean 1 (``"rise"``: ``2 (i + 1) / (n + 1)``, ``"fall"``: its mirror).
    Exact for Adam-type optimizers: their update is proportional to the learning rate, so scaling a block's step
    after it is taken is the same as a group at the scaled rate."""

    def __init__(self, profile: str) -> None:
        if profile not in ("rise", "fall"):
            raise ValueError(f"depth must be 'rise' or 'fall', got {profile!r}")
        self.profile, self._before = profile, {}

    def factors(self, n: int) -> list[float]:
        rise = [2 * (i + 1) / (n + 1) for i in range(n)]
        return rise if self.profile == "rise" else rise[::-1]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        from lightning_dfa.callbacks.common import find_dfa

        modules = dict(pl_module.named_modules())
        points = find_dfa(trainer).points
        self._before = {
            (param, factor): param.detach().clone()
            for name, factor in zip(points, self.factors(len(points)))
            for param in modules[name].parameters()
            if param.requires_grad
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for (param, factor), before in self._before.items():
                param.copy_(before + factor * (param - before))
        self._before = {}


def schedule(method: str) -> tuple[str, pl.Callback | None]:
    """``method`` without its ``hold=`` / ``ramp=`` / ``depth=`` items, and the callback they make (or ``None``)."""
    every = re.split(r",(?![^\[]*\])", method)
    items = [item for item in every if item.split("=")[0] not in ("hold", "ramp", "depth")]
    pairs = dict(item.split("=", 1) for item in every if "=" in item)
    rest = ",".join(items) or "dfa"
    if "depth" in pairs:
        return rest, DepthScale(pairs["depth"])
    timing = {k: int(v) for k, v in pairs.items() if k in ("hold", "ramp")}
    return rest, ScaleSchedule(**timing) if timing else None


def strategy(method: str):
    """``"dfa"``, ``"frozen"``, ``"backprop"``, or ``"setting=value,..."``: DFA with those settings changed
    (``lr_scale=0.03``, ``embeddings=first_block``), to compare with the defaults."""
    from lightning_dfa import DFAStrategy

    if "=" in method:  # "embeddings=first_block,lr_scale=0"
        items = re.split(r",(?![^\[]*\])", method)  # commas inside [...] belong to a list
        settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}
        if settings.get("projector") == "shared":  # one Gaussian matrix for the 4 blocks of the GPTs (d_e = 2048)
            generator = torch.Generator().manual_seed(0)
            settings["projector"] = torch.randn(2048, 128, generator=generator).repeat(1, 4) / math.sqrt(2048)
        return DFAStrategy(**settings)
    return {"dfa": "dfa", "frozen": DFAStrategy(mode="frozen"), "backprop": "auto"}[method]


def train_one(family: str, method: str, seed: int, lr: float, alignment: bool = False) -> dict:
    """One run in this process: the metrics of the last validation (with ``alignment``, DFA's alignment per block
    every 50 steps: ``lightning_dfa.callbacks.Alignment``)."""
    from lightning_dfa.callbacks import Alignment

    make_data, make_model, budget, _ = FAMILIES[family]
    pl.seed_everything(seed, verbose=False)
    data = make_data()
    data.prepare_data()
    data.setup("fit")
    model = make_model(data)
    model.lr = lr
    probe = Alignment(every_n_steps=50) if alignment and method not in ("frozen", "backprop") else None
    method, timing = schedule(method)
    trainer = pl.Trainer(
        callbacks=[c for c in (probe, timing) if c] or None,
        strategy=strategy(method),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None if "max_steps" in budget else 1,
        **budget,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
    if family != "resnet":
        metrics["val/ppl"] = math.exp(metrics["val/loss"])
    result = {"metrics": metrics, "fit_s": round(time.perf_counter() - started, 1)}
    return {**result, "alignment": probe.history} if probe else result


def run(family: str, method: str, seed: int, lr: float, root: Path, alignment: bool = False) -> dict:
    done = root / family / (method if lr == LR else f"{method} lr={lr:g}") / f"seed{seed}.json"
    if done.exists():
        return json.loads(done.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    argv = [sys.executable, __file__, "--one", family, method, str(seed), "--lr", str(lr)]
    argv += ["--alignment"] if alignment else []
    process = subprocess.run(argv, capture_output=True, text=True, env=env)
    result = {"family": family, "method": method, "seed": seed, "lr": lr}
    if process.returncode != 0:
        result["failed"] = (process.stdout + process.stderr).strip().splitlines()[-1:]
    else:
        result.update(json.loads(process.stdout.strip().splitlines()[-1]))
    print(f"{family:<7} {method:<9} lr {lr:g} seed {seed}: {result.get('metrics', result.get('failed'))}", flush=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    """Mean ± sd over seeds, each method at its best learning rate (lower is better for every metric here)."""
    lines = [
        "| family | metric | DFA (defaults) | frozen control | backprop | DFA / frozen | DFA / backprop |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, (*_, metric) in FAMILIES.items():
        best = {method: _best(results, family, method, metric) for method in METHODS}
        if not all(best.values()):
            continue
        cells = [f"{m:.4g} ± {sd:.2g} (lr {lr:g}, {n} seeds)" for m, sd, lr, n in best.values()]
        dfa, frozen, backprop = (best[m][0] for m in METHODS)
        lines.append(f"| {family} | {metric} | {' | '.join(cells)} | {dfa / frozen:.2f} | {dfa / backprop:.2f} |")
    return "\n".join(lines)


def variants(results: list[dict]) -> str:
    """DFA with one setting changed (``--methods lr_scale=0.03``), beside the default."""
    lines = ["| family | DFA with | metric | mean ± sd | seeds |", "|---|---|---|---|---|"]
    for family, (*_, metric) in FAMILIES.items():
        methods = sorted({r["method"] for r in results if r["family"] == family and "=" in r["method"]})
        for method in methods:
            mean, sd, lr, n = _best(results, family, method, metric)
            lines.append(f"| {family} | {method} (lr {lr:g}) | {metric} | {mean:.4g} ± {sd:.2g} | {n} |")
    return "\n".join(lines)


def _best(results: list[dict], family: str, method: str, metric: str) -> tuple[float, float, float, int] | None:
    by_lr: dict[float, list[float]] = {}
    for r in results:
        if r["family"] == family and r["method"] == method and "metrics" in r:
            by_lr.setdefault(r.get("lr", LR), []).append(r["metrics"][metric])
    if not by_lr:
        return None
    lr, values = min(by_lr.items(), key=lambda item: statistics.fmean(item[1]))
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread, lr, len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES, choices=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"{METHODS} or setting=value")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[LR], help="AdamW learning rates (each method's best)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--root", default="runs/heldout")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--alignment", action="store_true", help="log DFA's alignment per block (every 50 steps)")
    parser.add_argument("--one", nargs=3, metavar=("FAMILY", "METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        family, method, seed = args.one
        print(json.dumps(train_one(family, method, int(seed), args.lr or LR, args.alignment)))
        return
    root = Path(args.root)
    cells = [(f, m, s, lr) for s in args.seeds for f in args.families for m in args.methods for lr in args.lrs]
    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda cell: run(*cell, root, args.alignment), cells))
    results = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/seed*.json"))]
    print(table(results))
    print(variants(results))


if __name__ == "__main__":
    main()
