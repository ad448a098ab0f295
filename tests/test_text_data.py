"""Text data: the local BPE tokenizer and its cache, sources, document splits, blocks, the unigram reference."""

import json
import math

import pytest
import torch

from lightning_dfa.data import tokenizer as tokenizer_module
from lightning_dfa.data.text import TextDataModule, cut_blocks, load_documents, split_documents
from lightning_dfa.data.tokenizer import bpe_tokenizer, load_tokenizer

DOCS = [
    f"Document {i}: the quick brown fox {'jumps over' if i % 2 else 'sleeps near'} the lazy dog number {i}.\n"
    f"Café, naïve, 東京 and tabs\tstay intact. " * 3
    for i in range(12)
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DFA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (root / ("nested" if i % 3 == 0 else "") / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return root


def test_the_tokenizer_round_trips_text():
    tok = bpe_tokenizer(DOCS, vocab_size=300)
    text = "Unseen words, émojis 🙂 and\n\n  odd   spacing\tsurvive: x**2 != {y}"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) <= 300
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_the_cache_is_reused_and_keyed_by_corpus_and_vocab_size(cache, monkeypatch):
    calls = []
    train = tokenizer_module._train
    monkeypatch.setattr(tokenizer_module, "_train", lambda docs, size: calls.append(size) or train(docs, size))
    first = bpe_tokenizer(DOCS, vocab_size=300)
    again = bpe_tokenizer(DOCS, vocab_size=300)
    assert calls == [300]
    assert again.get_vocab() == first.get_vocab()
    bpe_tokenizer(DOCS, vocab_size=320)
    bpe_tokenizer(DOCS[:-1], vocab_size=300)
    assert calls == [300, 320, 300]
    assert len(list((cache / "tokenizers").iterdir())) == 3


def test_a_saved_tokenizer_folder_loads_and_a_missing_one_is_a_clear_error(tmp_path):
    bpe_tokenizer(DOCS, vocab_size=300).save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").decode([0]) == "<|endoftext|>"
    with pytest.raises(FileNotFoundError, match=r"is not a folder.*save_pretrained"):
        load_tokenizer(tmp_path / "nowhere")


def test_splits_are_by_document_disjoint_and_deterministic():
    dm = TextDataModule(source="pydoc", val_fraction=0.1, test_fraction=0.1, split_seed=0)
    train, val, test = dm.documents["train"], dm.documents["val"], dm.documents["test"]
    assert (len(train), len(val), len(test)) == (63, 8, 8)
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert sorted(train + val + test) == sorted(load_documents("pydoc"))
    assert TextDataModule(source="pydoc").documents == dm.documents
    assert TextDataModule(source="pydoc", split_seed=1).documents["val"] != val


def test_validation_documents_do_not_depend_on_the_test_fraction():
    held_out = {f: TextDataModule(source="pydoc", test_fraction=f).documents for f in (0.05, 0.2)}
    assert held_out[0.05]["val"] == held_out[0.2]["val"]
    assert len(held_out[0.05]["test"]) == 4 and len(held_out[0.2]["test"]) == 16


def test_the_test_loader_reads_test_documents_not_validation_ones(folder):
    dm = TextDataModule(source=str(folder), bpe_vocab_size=300, block_size=16, batch_size=4, val_fraction=0.25)
    dm.setup()
    assert not torch.equal(dm.splits["test"], dm.splits["val"])
    assert torch.equal(next(iter(dm.test_dataloader())), dm.splits["test"][:4])


def test_a_folder_gives_one_document_per_file_and_blocks_of_block_size_plus_one(folder):
    dm = TextDataModule(source=str(folder), bpe_vocab_size=300, block_size=16, batch_size=4, val_fraction=0.25)
    dm.setup()
    assert sorted(dm.documents["train"] + dm.documents["val"] + dm.documents["test"]) == sorted(DOCS)
    assert (len(dm.documents["val"]), len(dm.documents["test"])) == (3, 1)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    assert int(batch.max()) < dm.vocab_size


def test_blocks_are_contiguous_windows_that_share_one_token():
    blocks = cut_blocks(torch.arange(10), block_size=3)
    assert blocks.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="val split has 3 tokens, fewer than block_size"):
        cut_blocks(torch.arange(3), block_size=3, split="val")


def test_a_txt_file_splits_into_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(DOCS[:4]) + "\n\n\n", encoding="utf-8")
    assert load_documents(str(path)) == [doc.strip("\n") for doc in DOCS[:4]]


def test_local_json_jsonl_and_csv_go_through_hf_datasets(tmp_path):
    rows = [{"body": doc, "id": i} for i, doc in enumerate(DOCS[:5])]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "rows.csv", index=False)
    for name in ("rows.jsonl", "rows.json", "rows.csv"):
        assert load_documents(str(tmp_path / name), text_field="body") == DOCS[:5], name
    with pytest.raises(ValueError, match=r"has no column 'text'.*\['body', 'id'\]"):
        load_documents(str(tmp_path / "rows.jsonl"))


def test_a_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not 'pydoc', 'hf:<dataset name>', or an existing file"):
        TextDataModule(source=str(tmp_path / "missing.txt")).setup()
    with pytest.raises(FileNotFoundError, match="has no .txt files"):
        load_documents(str(tmp_path))


def test_an_unknown_or_uncached_hf_dataset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match=r"'no-such-corpus-xyz'.*not in the local HF cache.*local \.jsonl"):
        load_documents("hf:no-such-corpus-xyz")


def test_too_few_documents_and_bad_fractions_are_clear_errors():
    with pytest.raises(ValueError, match="at least 3 documents"):
        split_documents(2, 0.1, 0.1, 0)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\) with a sum below 1, got 1.0 and 0.1"):
        TextDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"sum below 1, got 0.5 and 0.5"):
        TextDataModule(val_fraction=0.5, test_fraction=0.5)


def test_the_unigram_reference_is_a_finite_perplexity_above_one(folder):
    dm = TextDataModule(source=str(folder), bpe_vocab_size=300, block_size=16, val_fraction=0.25)
    references = dm.reference_metrics()
    assert set(references) == {"unigram val ppl", "unigram test ppl"}
    assert all(math.isfinite(ppl) and 1 < ppl < dm.vocab_size for ppl in references.values())
