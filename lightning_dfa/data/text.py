"""Text for next-token prediction: bundled pydoc corpus, local files and folders, or HF ``datasets``.

Documents are split into train / validation / test (seeded, by document), tokenized, each followed by end-of-text,
and cut into blocks of ``block_size + 1`` tokens.

Example::

    dm = TextDataModule("notes/", block_size=256)                      # a folder of .txt files
    dm = TextDataModule("hf:wikitext", dataset_config="wikitext-2-raw-v1", tokenizer="/models/gpt2")
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lightning_dfa.data.splits import SplitDataModule, check_fractions
from lightning_dfa.data.tokenizer import bpe_tokenizer, load_tokenizer

#: HF ``datasets`` loader for each local file type.
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class TextDataModule(SplitDataModule):
    """Blocks of ``block_size + 1`` token ids (``LongTensor[B, block_size + 1]`` batches) from one text source.

    ``source``: ``"pydoc"``, a ``.txt`` file or folder, a ``.jsonl``/``.json``/``.csv``/``.parquet`` table
    (``text_field``), or ``"hf:<name>"``. ``tokenizer``: a local folder; None trains a BPE of ``bpe_vocab_size``.
    ``val_fraction`` and ``test_fraction`` of the documents are held out, each unseen by training and by the other.
    """

    def __init__(
        self,
        source: str = "pydoc",
        tokenizer: str | None = None,
        bpe_vocab_size: int = 4096,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        dataset_config: str | None = None,
        text_field: str = "text",
    ) -> None:
        super().__init__()
        check_fractions(val_fraction, test_fraction)
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}.")
        self.save_hyperparameters()
        self._documents: dict[str, list[str]] | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # -- documents and tokenizer (built on first use, so a model can ask for the vocabulary early) --
    @property
    def documents(self) -> dict[str, list[str]]:
        """``{"train": [...], "val": [...], "test": [...]}``: the source's documents, split by document."""
        if self._documents is None:
            hp = self.hparams
            docs = load_documents(hp.source, hp.dataset_config, hp.text_field)
            splits = split_documents(len(docs), hp.val_fraction, hp.test_fraction, hp.split_seed)
            self._documents = {split: [docs[i] for i in index] for split, index in splits.items()}
        return self._documents

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: loaded from ``tokenizer=`` or trained on the training documents (cached)."""
        if self._tokenizer is None:
            path = self.hparams.tokenizer
            self._tokenizer = (
                load_tokenizer(path) if path else bpe_tokenizer(self.documents["train"], self.hparams.bpe_vocab_size)
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the embedding a model needs: ``len(self.tokenizer)`` (special tokens included)."""
        return len(self.tokenizer)

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, docs in self.documents.items():
            stream = token_stream(self.tokenizer, docs)
            self.splits[split] = cut_blocks(stream, self.hparams.block_size, split)

    # -- baselines -----------------------------------------------------------------------------------
    def reference_metrics(self) -> dict[str, float]:
        """``{"unigram val ppl": p, "unigram test ppl": q}``: the perplexity, on each held-out split's block
        targets, of add-one smoothed training token frequencies. A model whose ``val/ppl`` is not below it learned
        nothing beyond them."""
        if not self.splits:
            self.setup()
        train = token_stream(self.tokenizer, self.documents["train"])
        counts = torch.bincount(train, minlength=self.vocab_size).double() + 1.0
        log_p = counts.log() - math.log(float(counts.sum()))
        targets = {split: self.splits[split][:, 1:].reshape(-1) for split in ("val", "test")}
        return {f"unigram {split} ppl": math.exp(-float(log_p[t].mean())) for split, t in targets.items()}


def load_documents(source: str, dataset_config: str | None = None, text_field: str = "text") -> list[str]:
    """The non-empty documents of ``source`` (see the module doc), in a fixed order."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[key] for key in sorted(topics)]
    elif source.startswith("hf:"):
        docs = _hf_documents(source[3:], dataset_config, text_field)
    else:
        docs = _local_documents(source, text_field)
    docs = [doc for doc in docs if doc and doc.strip()]
    if not docs:
        raise ValueError(f"The text source {source!r} has no non-empty documents.")
    return docs


def split_documents(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """``{"train", "val", "test"}`` document indices (sorted, disjoint): at least one document each, about
    ``val_fraction * n`` for validation and ``test_fraction * n`` for test. A seeded permutation puts validation
    first, so the validation documents do not depend on ``test_fraction``."""
    if n < 3:
        raise ValueError(
            f"Splitting by document needs at least 3 documents (train, val, test), the source has {n}. Give a "
            "folder of files, a .txt file with blank-line separated paragraphs, or a table with one document per row."
        )
    n_val = min(n - 2, max(1, round(val_fraction * n)))
    n_test = min(n - 1 - n_val, max(1, round(test_fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = n_val + n_test
    return {"train": sorted(order[held_out:]), "val": sorted(order[:n_val]), "test": sorted(order[n_val:held_out])}


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> Tensor:
    """All documents' token ids, each followed by the end-of-text token, as one ``LongTensor``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"The tokenizer {type(tokenizer).__name__} has no eos token to separate documents.")
    ids = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in (*doc, eos)], dtype=torch.long)


def cut_blocks(stream: Tensor, block_size: int, split: str = "train") -> Tensor:
    """Contiguous windows ``stream[i*b : i*b + b + 1]`` (``b = block_size``): ``LongTensor[n, b + 1]``."""
    if len(stream) < block_size + 1:
        raise ValueError(
            f"The {split} split has {len(stream)} tokens, fewer than block_size + 1 = {block_size + 1}: lower "
            "block_size, use a larger corpus, or move documents to this split (val_fraction, test_fraction)."
        )
    return stream.unfold(0, block_size + 1, block_size).contiguous()


def _local_documents(source: str, text_field: str) -> list[str]:
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Text source {source!r} is not 'pydoc', 'hf:<dataset name>', or an existing file or folder. Give a "
            f".txt file, a folder of .txt files, a {'/'.join(FILE_LOADERS)} file, or 'hf:{source}' for a "
            "HuggingFace dataset."
        )
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"The folder {str(path)!r} has no .txt files (each .txt file is a document).")
        return [file.read_text(encoding="utf-8") for file in files]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").split("\n\n")
    if suffix in FILE_LOADERS:
        import datasets

        table = datasets.load_dataset(FILE_LOADERS[suffix], data_files=str(path), split="train")
        return _column(table, text_field, str(path))
    raise ValueError(
        f"Cannot read {str(path)!r}: text sources are .txt files, folders of them, or {sorted(FILE_LOADERS)} files."
    )


def _hf_documents(name: str, config: str | None, text_field: str) -> list[str]:
    import datasets

    try:
        table = datasets.load_dataset(name, config, split="train")
    except Exception as err:  # offline, not cached, unknown name, or a missing config: say what to do
        raise FileNotFoundError(
            f"HF dataset {name!r} (config {config!r}) could not be loaded: it is not in the local HF cache and could "
            f"not be downloaded ({type(err).__name__}: {err}). Download it once with network access, or pass a local "
            ".jsonl/.parquet/.txt file as source; check the name and dataset_config ('hf:wikitext' needs "
            "'wikitext-2-raw-v1')."
        ) from err
    return _column(table, text_field, f"hf:{name}")


def _column(table, text_field: str, where: str) -> list[str]:
    if text_field not in table.column_names:
        raise ValueError(f"{where} has no column {text_field!r}; its columns are {table.column_names}: set text_field.")
    return list(table[text_field])
