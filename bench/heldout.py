"""Held-out families: the plugin's defaults on models the learning study never saw, written as a user would.

Llama-style causal LM on pydoc text, a BERT-style encoder classifying digits read as tokens, torchvision's
ResNet-18 on digits.

    python bench/heldout.py                                   # 3 families x {dfa, frozen, backprop} x seeds 0 1 2
    python bench/heldout.py --families resnet --seeds 0       # one cell
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
    "bert": (digits_data, lambda dm: BertDigits(), {"max_epochs": 8}, "val/error"),
    "resnet": (digits_data, lambda dm: ResNetDigits(), {"max_epochs": 8}, "val/error"),
}
METHODS = ("dfa", "frozen", "backprop")

#: The users' AdamW learning rate (``--lrs`` tries others: each method is compared at its own best).
LR = 1e-3


def strategy(method: str):
    """``"dfa"``, ``"frozen"``, ``"backprop"``, or ``"setting=value,..."``: DFA with those settings changed
    (``lr_scale=0.03``, ``embeddings=first_block``), to compare with the defaults."""
    from lightning_dfa import DFAStrategy

    if "=" in method:  # "embeddings=first_block,lr_scale=0"
        settings = dict(item.split("=") for item in method.split(","))
        return DFAStrategy(**{key: yaml.safe_load(value) for key, value in settings.items()})
    return {"dfa": "dfa", "frozen": DFAStrategy(mode="frozen"), "backprop": "auto"}[method]


def train_one(family: str, method: str, seed: int, lr: float) -> dict:
    """One run in this process: the metrics of the last validation."""
    make_data, make_model, budget, _ = FAMILIES[family]
    pl.seed_everything(seed, verbose=False)
    data = make_data()
    data.prepare_data()
    data.setup("fit")
    model = make_model(data)
    model.lr = lr
    trainer = pl.Trainer(
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
    return {"metrics": metrics, "fit_s": round(time.perf_counter() - started, 1)}


def run(family: str, method: str, seed: int, lr: float, root: Path) -> dict:
    done = root / family / (method if lr == LR else f"{method} lr={lr:g}") / f"seed{seed}.json"
    if done.exists():
        return json.loads(done.read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    argv = [sys.executable, __file__, "--one", family, method, str(seed), "--lr", str(lr)]
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
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"{METHODS} or setting=value")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[LR], help="AdamW learning rates (each method's best)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--root", default="runs/heldout")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("FAMILY", "METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        family, method, seed = args.one
        print(json.dumps(train_one(family, method, int(seed), args.lr or LR)))
        return
    root = Path(args.root)
    cells = [(f, m, s, lr) for s in args.seeds for f in args.families for m in args.methods for lr in args.lrs]
    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda cell: run(*cell, root), cells))
    results = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/seed*.json"))]
    print(table(results))
    print(variants(results))


if __name__ == "__main__":
    main()
