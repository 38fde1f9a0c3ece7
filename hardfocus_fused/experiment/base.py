"""The built-in base model: a small Llama-style model trained once on the built-in corpus
and cached, so that ``hardfocus-train`` continues a *trained* model, as the paper does.

The base trains with the plain token-mean loss on the first ``corpus.NEW_FACTS_FROM``
documents of the built-in training stream (the old facts; a cosine schedule to a small
learning rate, flat at the end); continual training reads the stream after them.  It is
saved under ``cache_dir() / recipe.name`` (``$HARDFOCUS_CACHE``, default
``~/.cache/hardfocus-fused``) with ``base.json`` (its recipe, the time it took and its
held-out losses per kind); a recipe change trains a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import KINDS, NEW_FACTS_FROM, builtin_examples, document_batches, train_builtin_tokenizer


@dataclass(frozen=True)
class BaseRecipe:
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    vocab_size: int = 512
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 600  # x batch_size = the corpus's NEW_FACTS_FROM documents: one pass over the old era
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0

    @property
    def name(self) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"base-{digest}"


def cache_dir() -> Path:
    return Path(os.environ.get("HARDFOCUS_CACHE", Path.home() / ".cache" / "hardfocus-fused"))


def new_model(recipe: BaseRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=2 * recipe.hidden_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.seq_len,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def heldout_batches(tokenizer, seq_len: int, batch_size: int, n_batches: int) -> dict[str, list[dict]]:
    """``n_batches`` held-out batches of each kind and of the mixture (``"mix"``)."""
    splits = {kind: f"heldout-{kind}" for kind in KINDS} | {"mix": "heldout"}
    return {
        name: list(
            itertools.islice(document_batches(builtin_examples(split), tokenizer, seq_len, batch_size), n_batches)
        )
        for name, split in splits.items()
    }


@torch.no_grad()
def token_mean_loss(model, batches: list[dict], device: torch.device) -> float:
    """The plain token-mean NLL of ``model`` (patched or not) over ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"].to(device)
        out = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), labels=labels
        )
        n = int((labels[:, 1:] != -100).sum())
        total += out.loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def train_base(path: Path, recipe: BaseRecipe, say=print) -> None:
    """Train the base model of ``recipe`` and save it (with its tokenizer) to ``path``."""
    from tqdm.auto import tqdm

    from ..hf import apply_hardfocus

    start = time.time()
    tokenizer = train_builtin_tokenizer(recipe.vocab_size)
    model = new_model(recipe, tokenizer)
    apply_hardfocus(model, method="mean", impl="torch" if not torch.cuda.is_available() else "auto")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    # Passes over the old era of the stream (the documents before the new facts).
    passes = itertools.chain.from_iterable(
        document_batches(
            itertools.islice(builtin_examples("train"), NEW_FACTS_FROM), tokenizer, recipe.seq_len, recipe.batch_size
        )
        for _ in itertools.count()
    )
    bar = tqdm(
        itertools.islice(passes, recipe.steps), total=recipe.steps, desc="base model (once)", disable=say is None
    )
    for batch in bar:
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        )
        out.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    heldout = heldout_batches(tokenizer, recipe.seq_len, recipe.batch_size, 4)
    losses = {name: token_mean_loss(model, batches, device) for name, batches in heldout.items()}
    from ..hf import remove_hardfocus

    remove_hardfocus(model)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "recipe": dataclasses.asdict(recipe),
        "seconds": round(time.time() - start, 1),
        "heldout": losses,
        "torch": torch.__version__,
        "device": str(device),
    }
    (tmp / "base.json").write_text(json.dumps(meta, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)  # a crash mid-training leaves no half-written base


DEFAULT_RECIPE = BaseRecipe()


def ensure_base(recipe: BaseRecipe | None = None, say=print) -> Path:
    """The cached base model's directory (of ``recipe``, default ``DEFAULT_RECIPE``),
    training it first if it is not there."""
    recipe = recipe or DEFAULT_RECIPE
    path = cache_dir() / recipe.name
    if not (path / "base.json").is_file():
        if say is not None:
            say(f"training the built-in base model once ({recipe.steps} batches), cached in {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        train_base(path, recipe, say)
    return path
