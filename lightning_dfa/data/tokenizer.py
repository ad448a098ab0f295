"""Tokenizers with no network: a byte-level BPE trained on the corpus and cached (``$LIGHTNING_DFA_CACHE``), or a
local path.

Example::

    tok = bpe_tokenizer(["first document", "second document"], vocab_size=300)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"
#: Bumped when the training recipe changes, so old cache entries are not reused.
FORMAT = "bpe-v1"


def cache_dir() -> Path:
    """Where trained tokenizers live: ``$LIGHTNING_DFA_CACHE/tokenizers`` or ``~/.cache/lightning-dfa/tokenizers``."""
    root = os.environ.get("LIGHTNING_DFA_CACHE") or Path.home() / ".cache" / "lightning-dfa"
    return Path(root) / "tokenizers"


def corpus_key(documents: Sequence[str], vocab_size: int) -> str:
    """A short hash of the documents (in order) and the vocabulary size: the cache entry's name."""
    digest = hashlib.sha256(f"{FORMAT}|{vocab_size}|{len(documents)}".encode())
    for doc in documents:
        digest.update(len(doc).to_bytes(8, "little"))
        digest.update(doc.encode("utf-8", errors="surrogatepass"))
    return f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"


def bpe_tokenizer(documents: Sequence[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``documents`` (cached), of at most ``vocab_size`` entries including
    the 256 byte symbols and the two special tokens; any text round-trips."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 byte symbols + 2 special tokens), got {vocab_size}.")
    if not documents:
        raise ValueError("Cannot train a tokenizer on an empty corpus: the source gave no documents.")
    target = cache_dir() / corpus_key(documents, vocab_size)
    if not (target / "tokenizer.json").exists():
        _save_atomically(_train(documents, vocab_size), target)
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer saved with ``save_pretrained`` in a local folder; it gets a pad token (eos) if it has none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Tokenizer path {str(path)!r} is not a folder. Give a local folder written by "
            "tokenizer.save_pretrained(...) (with tokenizer.json or the vocab files), or tokenizer=None to "
            "train a byte-level BPE on the corpus."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _train(documents: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def _save_atomically(tokenizer: PreTrainedTokenizerFast, target: Path) -> None:
    """Write to a temporary folder and rename it, so concurrent processes (DDP ranks) never read half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, target)
    except OSError:  # another process saved the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "tokenizer.json").exists():
            raise
