"""``CausalLM``: any HuggingFace ``AutoModelForCausalLM`` as a LightningModule, trained on next-token loss.

Example::

    lm = CausalLM(config={"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4})
    Trainer(strategy="dfa", max_steps=600).fit(lm, datamodule=TextDataModule())   # vocab from the data
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lightning_dfa import _lightning_compat
from lightning_dfa.callbacks.common import find_dfa
from lightning_dfa.models.base import DFAModule, built, local_checkpoint
from lightning_dfa.optim import param_groups
from lightning_dfa.random_state import isolated

SCHEDULES = ("cosine", "constant")


class CausalLM(DFAModule):
    """Next-token prediction with ``self.model``, a HuggingFace causal LM built from a config or a local folder.

    ``config``: ``{"model_type": "gpt2" | "llama" | ..., **config_kwargs}``, or ``pretrained``: a local folder;
    ``vocab_size`` defaults to the config's, else the datamodule's. AdamW, warmup then a ``"cosine"`` or
    ``"constant"`` ``schedule``; token-weighted ``val/ppl``; a sample of ``sample_prompt`` after each validation.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        pretrained: str | None = None,
        vocab_size: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        schedule: str = "constant",
        sample_prompt: str = "The",
        sample_tokens: int = 32,
        sample_top_k: int = 20,
        sample_seed: int = 0,
        dfa: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (config is None) == (pretrained is None):
            raise ValueError(
                "CausalLM needs exactly one of config={'model_type': 'gpt2', ...} (a new model) or "
                f"pretrained='<local folder>' (a saved one); got config={config!r}, pretrained={pretrained!r}."
            )
        if config is not None and "model_type" not in config:
            raise ValueError(f"config needs a 'model_type' (e.g. 'gpt2', 'llama'), got keys {sorted(config)}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self._samples: list[list[Any]] = []
        if pretrained is not None or vocab_size is not None or "vocab_size" in config:
            self.build()

    # -- building the HF model ---------------------------------------------------------------------------
    def build(self, vocab_size: int | None = None, tokenizer: Any = None) -> PreTrainedModel:
        """Build ``self.model`` (once): from ``pretrained``, or from ``config`` with the given vocabulary."""
        if self.model is not None:
            return self.model
        hp = self.hparams
        if hp.pretrained is not None:
            self.model = AutoModelForCausalLM.from_pretrained(local_checkpoint(hp.pretrained), dtype=torch.float32)
        else:
            kwargs = {k: v for k, v in hp.config.items() if k != "model_type"}
            kwargs["vocab_size"] = hp.vocab_size or kwargs.get("vocab_size") or vocab_size
            if not kwargs["vocab_size"]:
                raise ValueError(
                    "CausalLM(config=...) does not know its vocabulary size: pass vocab_size=..., set "
                    "config['vocab_size'], or train with a datamodule that has .vocab_size (TextDataModule)."
                )
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if tokenizer is not None and name not in kwargs and getattr(tokenizer, name, None) is not None:
                    kwargs[name] = getattr(tokenizer, name)
            self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hp.config["model_type"], **kwargs))
        hp.vocab_size = self.model.get_input_embeddings().num_embeddings
        check_vocabulary(tokenizer, hp.vocab_size)
        count = sum(p.numel() for p in self.model.parameters())
        rank_zero_info(f"CausalLM: {type(self.model).__name__} with {count:,} parameters")
        return self.model

    def _build_from_trainer(self) -> None:
        """Build with the attached datamodule's vocabulary (the first hook that sees it calls this)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if self.model is None:
            self.build(getattr(datamodule, "vocab_size", None), tokenizer)
        check_vocabulary(tokenizer, self.hparams.vocab_size)

    def configure_model(self) -> None:
        self._build_from_trainer()

    def dfa_defaults(self) -> dict[str, Any]:
        """Feedback at every transformer block (HF's ``_no_split_modules``), error at the logits: the LM head,
        found by ``blocks="auto"`` as HF's output embeddings. The embeddings are not points: they learn only
        where tied to the head (``embeddings=`` adds them)."""
        return {"blocks": "auto"}

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        how = "give vocab_size=... (or config['vocab_size']), or let a Trainer with a TextDataModule build it."
        return built(self.model, "CausalLM", how)(input_ids=input_ids).logits

    def _loss(self, batch: Tensor | dict[str, Tensor]) -> tuple[Tensor, int]:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        inputs, targets = ids[:, :-1], ids[:, 1:]
        logits = self(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return loss, targets.numel()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self.val_loss.update(loss, weight=tokens)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        loss, tokens = self._loss(batch)
        self.test_loss.update(loss, weight=tokens)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_loss, "val")
        if not self.trainer.sanity_checking:
            self._record_sample()

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_loss, "test")

    def _log_epoch(self, metric: MeanMetric, split: str) -> None:
        loss = metric.compute()  # token-weighted mean over the epoch, synced across ranks
        metric.reset()
        # sync_dist: the value is the same on every rank already (compute() synced it); without it Lightning warns.
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=True)
        self.log(f"{split}/ppl", loss.exp(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self, hp.lr, hp.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        if hp.schedule == "cosine" and math.isfinite(total):
            scheduler = get_cosine_schedule_with_warmup(optimizer, hp.warmup_steps, int(total))
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, hp.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- samples ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_sample(self, tokenizer: Any) -> str:
        """``sample_tokens`` tokens after ``sample_prompt`` (top-k, seeded; the global RNG is left untouched).
        Under FSDP every rank must call it: the parameters are gathered whole for the generation."""
        hp = self.hparams
        ids = tokenizer(hp.sample_prompt, return_tensors="pt")["input_ids"].to(self.device)
        with isolated(seed=hp.sample_seed), _whole_parameters(self):
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=hp.sample_tokens,
                do_sample=True,
                top_k=hp.sample_top_k,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        return tokenizer.decode(out[0], skip_special_tokens=False)

    def _record_sample(self) -> None:
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            rank_zero_warn("CausalLM: the datamodule has no .tokenizer, so no text sample is generated.")
            return
        text = self.generate_sample(tokenizer)
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: every rank asks
        if not self.trainer.is_global_zero:
            return
        epoch, step = self.current_epoch, self.global_step
        dfa = find_dfa(self.trainer)
        mode = f" ({dfa.mode})" if dfa is not None else ""  # baselines share the run directory
        path = Path(log_dir) / "samples.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as file:
            file.write(f"--- epoch {epoch}, step {step}{mode}\n{text}\n")
        self._samples.append([epoch, step, text])
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["epoch", "step", "text"], data=list(self._samples))


def _whole_parameters(module: pl.LightningModule) -> AbstractContextManager:
    """Under torch's FSDP (1), a context in which ``module``'s parameters are whole (a collective): ``generate``
    calls the HF model directly, not the FSDP wrapper, so it would see only this rank's shards.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = getattr(getattr(_lightning_compat.attached_trainer(module), "strategy", None), "model", None)
    if isinstance(wrapper, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapper, writeback=False)
    return nullcontext()


def check_vocabulary(tokenizer: Any, model_vocab: int) -> None:
    """Refuse a tokenizer whose ids would overflow the model's embedding (an index error deep in the model)."""
    if tokenizer is not None and len(tokenizer) > model_vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding only {model_vocab}: use the "
            "model's own tokenizer (TextDataModule(tokenizer=<the pretrained folder>)) or a larger vocab_size."
        )
