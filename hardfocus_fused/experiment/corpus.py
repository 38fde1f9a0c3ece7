"""Text for the training CLI: where documents come from and how they become batches.

Sources, all yielding documents (strings) in a fixed order so a resumed run sees the same
stream:

- ``"builtin"``: a deterministic synthetic corpus with the structure the paper's claim is
  about (no download).  Three kinds of document (``KINDS``), mixed 70 / 15 / 15 in the
  training stream:

  - ``"common"``: short stories from a small grammar, which a base model learns well;
  - ``"informative"``: rarer, learnable but hard text: statements of a table of facts
    (invented creatures: where each lives, what it eats, its 4-digit tag), whose answers
    a model must memorise; the stream after the base model's part, and the held-out
    splits, state facts the base never saw;
  - ``"noise"``: the same words shuffled and random letter strings, irreducible: the
    highest loss, nothing to learn.

  Held-out splits: ``"heldout-<kind>"`` for each kind and ``"heldout"`` (the mixture),
  each from its own random stream.
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
    return (
        f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
        f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_PLACES)} ."
    )


def _clean_document(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))


def _noisy_document(rng: random.Random) -> str:
    words = _clean_document(rng).split()
    rng.shuffle(words)
    junk = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(len(words) // 3)
    ]
    mixed = words + junk
    rng.shuffle(mixed)
    return " ".join(mixed)


KINDS = ("common", "informative", "noise")
MIXTURE = {"common": 0.70, "informative": 0.15, "noise": 0.15}
# The training stream's first NEW_FACTS_FROM documents (what the built-in base model
# trains on) state one table of facts; the documents after them, and the held-out
# splits, state another: continual training meets knowledge its base has never seen.
NEW_FACTS_FROM = 9600
_HOMES = [
    "the marsh",
    "the glacier",
    "the canyon",
    "the orchard",
    "the harbour",
    "the desert",
    "the tower",
    "the cave",
    "the meadow",
    "the island",
]
_FOODS = [
    "amber moss",
    "silver beans",
    "blue honey",
    "salt roots",
    "iron plums",
    "glass berries",
    "smoke fish",
    "copper nuts",
]


def _facts(era: str, n: int = 40) -> dict[str, tuple[str, str, str]]:
    """A fixed table of ``n`` invented creatures: each one's home, food and 4-digit tag."""
    rng = random.Random(f"facts-{era}")
    table = {}
    while len(table) < n:
        name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        tag = " ".join(rng.choice("0123456789") for _ in range(4))
        table.setdefault(name, (rng.choice(_HOMES), rng.choice(_FOODS), tag))
    return table


_FACTS = {"old": _facts("old"), "new": _facts("new")}


def _informative_document(rng: random.Random, era: str = "new") -> str:
    facts = _FACTS[era]
    sentences = []
    for name in rng.sample(sorted(facts), rng.randint(3, 6)):
        home, food, tag = facts[name]
        sentences.append(f"the {name} lives in {home} , eats {food} and wears the tag {tag} .")
    return " ".join(sentences)


def builtin_examples(split: str = "train", seed: int = 0) -> Iterator[tuple[str, str]]:
    """``(kind, text)`` of the built-in corpus, endless and deterministic: ``"train"`` and
    ``"heldout"`` mix the kinds (``MIXTURE``); ``"heldout-<kind>"`` has one kind.  Every
    split draws from its own random stream.  Informative documents state the old table of
    facts in the first ``NEW_FACTS_FROM`` training documents, the new one after them and
    in the held-out splits."""
    rng = random.Random(f"{split}-{seed}")
    kinds, shares = zip(*MIXTURE.items())
    only = split.split("-", 1)[1] if split.startswith("heldout-") else None
    if only is not None and only not in KINDS:
        raise ValueError(f"unknown built-in split {split!r}; the kinds are {KINDS}")
    for i in itertools.count():
        kind = only or rng.choices(kinds, shares)[0]
        if kind == "informative":
            era = "old" if split == "train" and i < NEW_FACTS_FROM else "new"
            yield kind, _informative_document(rng, era)
        else:
            yield kind, (_clean_document if kind == "common" else _noisy_document)(rng)


def builtin_documents(split: str = "train", seed: int = 0) -> Iterator[str]:
    """The texts of :func:`builtin_examples`."""
    return (text for _, text in builtin_examples(split, seed))


def shuffled(items: Iterator, seed: int, buffer: int = 1024) -> Iterator:
    """``items`` in a seeded shuffle-buffer order (a different data order per seed)."""
    rng = random.Random(f"shuffle-{seed}")
    pool = list(itertools.islice(items, buffer))
    for item in items:
        index = rng.randrange(len(pool))
        yield pool[index]
        pool[index] = item
    rng.shuffle(pool)
    yield from pool


def document_batches(examples: Iterator[tuple[str, str]], tokenizer, seq_len: int, batch_size: int) -> Iterator[dict]:
    """One document per row, as the authors' code trains: each ``(kind, text)`` tokenized,
    cut to ``seq_len`` tokens and right-padded, the padding masked (``attention_mask`` 0,
    ``labels`` -100).  Yields ``{"input_ids", "attention_mask", "labels", "kinds"}``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    while True:
        rows = list(itertools.islice(examples, batch_size))
        if len(rows) < batch_size:
            return
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len] for _, text in rows]
        width = max(len(x) for x in ids)
        input_ids = torch.full((batch_size, width), pad, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        yield {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": input_ids.masked_fill(mask == 0, -100),
            "kinds": [kind for kind, _ in rows],
        }


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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    sample = itertools.islice(builtin_documents("train"), 2000)
    bpe.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
