"""Text for the training CLI: where documents come from and how they become batches.

Sources, all yielding documents (strings) in a fixed order so a resumed run sees the same
stream:

- ``"builtin"``: a deterministic synthetic corpus, no download.  Most documents are short
  stories from a small grammar (learnable); a quarter are *noisy* (the same words
  shuffled, plus random letter strings): the hard, high-loss samples the weighting reacts
  to.  The held-out split is clean grammar text only.
- a local ``.txt`` file (documents separated by blank lines) or ``.jsonl`` (a ``"text"``
  field per line);
- a Hugging Face dataset name (``allenai/c4``), streamed with ``datasets``.

Documents are tokenized, joined with the EOS token and cut into fixed-length chunks, as
the paper does for continual pre-training.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

_NOUNS = ["cat", "dog", "bird", "child", "farmer", "river", "tree", "ship", "teacher", "robot", "garden", "city"]
_ADJECTIVES = ["small", "old", "quiet", "bright", "lazy", "brave", "green", "cold", "happy", "tall"]
_VERBS = ["sees", "follows", "helps", "finds", "watches", "carries", "paints", "calls", "meets", "builds"]
_PLACES = ["by the sea", "in the morning", "near the hill", "after the rain", "at night", "in the old town"]
_DEFAULT_DATASET_CONFIGS = {"allenai/c4": "en"}


def _sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
            f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)} .")


def _clean_document(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))


def _noisy_document(rng: random.Random) -> str:
    words = _clean_document(rng).split()
    rng.shuffle(words)
    junk = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
            for _ in range(len(words) // 3)]
    mixed = words + junk
    rng.shuffle(mixed)
    return " ".join(mixed)


def builtin_documents(split: str = "train", seed: int = 0) -> Iterator[str]:
    """The built-in corpus, endless and deterministic: ``"train"`` (a quarter noisy) or
    ``"heldout"`` (clean, drawn from a different random stream)."""
    rng = random.Random(f"{split}-{seed}")
    for i in itertools.count():
        yield _noisy_document(rng) if split == "train" and i % 4 == 3 else _clean_document(rng)


def file_documents(path: Path) -> Iterator[str]:
    """Documents of a ``.txt`` (blank-line separated) or ``.jsonl`` (``"text"`` field) file."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]
        return
    text = path.read_text(encoding="utf-8")
    yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())


def hub_documents(name: str, config: str | None, split: str = "train") -> Iterator[str]:
    """A Hugging Face dataset's ``"text"`` field, streamed (needs ``datasets`` and network)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("streaming a Hugging Face dataset needs the datasets package: pip install datasets") from None
    config = config or _DEFAULT_DATASET_CONFIGS.get(name)
    for row in datasets.load_dataset(name, config, split=split, streaming=True):
        yield row["text"]


def documents(source: str, config: str | None = None) -> Iterator[str]:
    """Documents of ``source``: ``"builtin"``, a local file, or a dataset name."""
    if source == "builtin":
        return builtin_documents("train")
    path = Path(source)
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise SystemExit(f"--dataset {source}: no such file")
        return file_documents(path)
    return hub_documents(source, config)


def chunks(docs: Iterator[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Token chunks of exactly ``seq_len``: documents joined by EOS, cut in order."""
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    for doc in docs:
        buffer += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len])
            buffer = buffer[seq_len:]


def batches(docs: Iterator[str], tokenizer, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """(batch_size, seq_len) int64 batches of consecutive chunks."""
    stream = chunks(docs, tokenizer, seq_len)
    while True:
        rows = list(itertools.islice(stream, batch_size))
        if len(rows) < batch_size:
            return
        yield torch.stack(rows)


def train_builtin_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic, seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = itertools.islice(builtin_documents("train"), 2000)
    bpe.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
