"""CausalLM: HF GPT-2 / Llama configs and local checkpoints, trained with DFA; samples; recipe sizes on meta."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from conftest import quiet_trainer, tiny_gpt2
from lightning.pytorch.loggers import CSVLogger

import lightning_dfa  # noqa: F401  (registers strategy="dfa")
from lightning_dfa import FeedbackEngine
from lightning_dfa.cli import RECIPES, run
from lightning_dfa.data.text import TextDataModule
from lightning_dfa.models.causal_lm import CausalLM

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32}
LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}
BLOCKS = {
    "gpt2": ["model.transformer.h.0", "model.transformer.h.1"],
    "llama": ["model.model.layers.0", "model.model.layers.1"],
}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DFA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        text = f"Note {i}. The model reads text and predicts the next token; the blocks learn from feedback. " * 4
        (root / f"note{i}.txt").write_text(text, encoding="utf-8")
    return TextDataModule(source=str(root), bpe_vocab_size=300, block_size=16, batch_size=4, val_fraction=0.25)


class FirstBlockSnapshot(pl.Callback):
    """Copies the first feedback point's first parameter when training starts."""

    def on_train_start(self, trainer, pl_module):
        block = pl_module.get_submodule(trainer.strategy.dfa.engine.points[0])
        self.before = next(block.parameters()).detach().clone()
        self.param = next(block.parameters())


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_a_config_trains_with_dfa_with_the_vocabulary_of_the_data(config, data, tmp_path):
    lm = CausalLM(config=config, sample_tokens=8)
    assert lm.model is None  # the vocabulary comes from the datamodule when the Trainer connects
    snapshot = FirstBlockSnapshot()
    trainer = quiet_trainer(
        strategy="dfa",
        max_steps=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path),  # a real logger merges the module's and the data's hparams: no clash
        callbacks=[snapshot],
    )
    trainer.fit(lm, datamodule=data)
    assert trainer.global_step == 2
    assert lm.model.get_input_embeddings().num_embeddings == data.vocab_size == lm.hparams.vocab_size
    assert trainer.strategy.dfa.engine.points == BLOCKS[config["model_type"]]
    assert not torch.equal(snapshot.before, snapshot.param.detach()), "the first block got no update"
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert float(metrics["val/ppl"]) == pytest.approx(math.exp(float(metrics["val/loss"])), rel=1e-5)
    samples = (Path(trainer.log_dir) / "samples.txt").read_text(encoding="utf-8")
    assert samples.startswith("--- epoch 0, step 2 (dfa)\nThe")  # one sample: none from the sanity check
    assert samples.count("--- epoch") == 1


def test_a_checkpoint_reloads_with_the_vocabulary_resolved_from_the_data(data, tmp_path):
    lm = CausalLM(config=GPT2)
    trainer = quiet_trainer(strategy="dfa", fast_dev_run=1, default_root_dir=tmp_path)
    trainer.fit(lm, datamodule=data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = CausalLM.load_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.hparams.vocab_size == data.vocab_size
    for (name, a), b in zip(lm.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_configure_dfa_selects_every_block_and_the_lm_head(config):
    lm = CausalLM(config=config, vocab_size=64)
    spec = lm.configure_dfa()
    assert spec == {"blocks": "auto"}, "the LM head is found as HF's output embeddings"
    with FeedbackEngine(**spec).attach(lm) as dfa:
        assert dfa.points == BLOCKS[config["model_type"]]
        assert dfa.output == "model.lm_head"
        loss, _ = lm._loss(torch.randint(0, 64, (2, 9)))
        loss.backward()
        trained = [*dfa.points, dfa.output]
    for name, param in lm.named_parameters():
        if name.startswith(tuple(trained)):
            assert param.grad is not None, name
    # Embeddings are not a point: under DFA they get no gradient unless tied to the head (GPT-2's wte).
    embedding = lm.model.get_input_embeddings().weight
    tied = embedding is lm.model.get_output_embeddings().weight
    assert (embedding.grad is not None) == tied


def test_a_local_pretrained_folder_loads_with_its_weights(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "gpt")
    lm = CausalLM(pretrained=str(tmp_path / "gpt"))
    ids = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(lm(ids), model(ids).logits)
    assert lm.hparams.vocab_size == 64 and lm.model.dtype == torch.float32


def test_missing_pretrained_folder_and_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a local folder with a config.json"):
        CausalLM(pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="exactly one of config"):
        CausalLM()
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        CausalLM(config={"n_layer": 2})
    with pytest.raises(RuntimeError, match="CausalLM is not built yet"):
        CausalLM(config=GPT2)(torch.zeros(1, 4, dtype=torch.long))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(data):
    lm = CausalLM(config={**GPT2, "vocab_size": 64})  # built at once; the data's BPE has up to 300 tokens
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's embedding only 64"):
        quiet_trainer(strategy="dfa", fast_dev_run=1).fit(lm, datamodule=data)


def recipe_model_args(name):
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["model"]["init_args"]


@pytest.mark.parametrize(("recipe", "low", "high"), [("llama-1b", 1e9, 1.2e9), ("gpt2-small", 1.2e8, 1.3e8)])
def test_gpu_recipes_build_at_full_size_on_the_meta_device(recipe, low, high):
    with torch.device("meta"):
        lm = CausalLM(**recipe_model_args(recipe))
    params = list(lm.model.parameters())
    assert all(p.is_meta for p in params)
    assert low < sum(p.numel() for p in params) < high


@pytest.mark.slow
def test_the_quickstart_recipe_runs_end_to_end(tmp_path):
    cli = run(
        [
            "fit",
            "--config",
            "quickstart",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 1
    assert type(cli.trainer.strategy.dfa.engine.projector).__name__ == "Gaussian"
    dfa = cli.trainer.strategy.dfa.engine
    assert dfa.lr_scale == "auto"  # the plugin's default: the recipe sets no learning rate for the blocks
    assert dfa.points_lr_scale == pytest.approx(min(0.1, dfa.config.head_lr_scale * cli.model.hparams.vocab_size**-0.5))
    assert math.isfinite(float(cli.trainer.callback_metrics["test/ppl"]))
