"""``hardfocus-train``: the paper's continual-training loop on a Hugging Face causal LM.

Load a model, stream text in fixed-length chunks, train ``--num-batches`` batches with
AdamW on the sample-reweighted loss (fused, no logits), and write to ``--output-dir``:
the final model (``save_pretrained``), ``log.json`` (per-step loss, weights, effective
sample size, tokens/s, peak memory; held-out loss before and after), ``training.png``
and a ``checkpoint/`` that ``--resume`` continues from.

With no arguments it trains a small built-in model on the built-in corpus, offline, in
well under three minutes on a CPU.  The paper's setting on a real model::

    hardfocus-train --model facebook/opt-125m --dataset allenai/c4 --method irdro --lr 5e-7 --r 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import time
from pathlib import Path

import torch

from .hf import apply_hardfocus, hardfocus_patch
from .weighting import METHODS

BUILTIN = "builtin"
_RESUMED_FROM_COMMAND_LINE = ("num_batches", "output_dir", "resume", "quiet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hardfocus-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=BUILTIN, help="hub id or local path of a causal LM; 'builtin' = a small "
                   "randomly initialised Llama-style model with a tokenizer trained on the built-in corpus")
    p.add_argument("--dataset", default=BUILTIN, help="a Hugging Face dataset name (streamed), a local .txt/.jsonl "
                   "file, or 'builtin' (synthetic, offline)")
    p.add_argument("--dataset-config", default=None, help="dataset configuration ('en' is used for allenai/c4)")
    p.add_argument("--method", default="irdro", choices=METHODS)
    p.add_argument("--r", type=float, default=10.0, help="IR-DRO temperature")
    p.add_argument("--n1", type=float, default=0.25, help="ranking methods: fraction of top losses skipped")
    p.add_argument("--n2", type=float, default=0.25, help="ranking methods: fraction of sequences kept")
    p.add_argument("--num-batches", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per chunk (default 128 built-in, 1024 otherwise)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3 for the built-in "
                   "model, the paper's 5e-7 otherwise)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches evaluated before and after")
    p.add_argument("--impl", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 for a hub model on a GPU, float32 otherwise")
    p.add_argument("--save-every", type=int, default=25, help="checkpoint every this many batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="hardfocus-run")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint "
                   "(its settings are kept; --num-batches may extend it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 128 if args.model == BUILTIN else 1024
    if args.lr is None:
        args.lr = 2e-3 if args.model == BUILTIN else 5e-7
    return args


# -- model and data ------------------------------------------------------------------------

def load_model_and_tokenizer(args: argparse.Namespace, device: torch.device, source: str | None = None):
    """The model (from ``source`` if given, e.g. a checkpoint) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .corpus import train_builtin_tokenizer

    dtype = torch.float32
    if args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and args.model != BUILTIN):
        dtype = torch.bfloat16
    if source is None and args.model == BUILTIN:
        tokenizer = train_builtin_tokenizer()
        torch.manual_seed(args.seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
                             tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        source = source or args.model
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.to(device), tokenizer


def data_streams(args: argparse.Namespace, tokenizer):
    """``(heldout, train)``: a list of held-out batches and an iterator of training batches."""
    from .corpus import batches, builtin_documents, documents

    make = lambda docs: batches(docs, tokenizer, args.seq_len, args.batch_size)
    if args.dataset == BUILTIN:
        heldout = list(itertools.islice(make(builtin_documents("heldout")), args.eval_batches))
        return heldout, make(builtin_documents("train"))
    stream = make(documents(args.dataset, args.dataset_config))
    heldout = list(itertools.islice(stream, args.eval_batches))   # the first batches are held out
    return heldout, stream


@torch.no_grad()
def heldout_loss(model, heldout: list[torch.Tensor], device: torch.device) -> float:
    """Mean token NLL over the held-out batches (fused, no logits)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    patch = hardfocus_patch(model)
    eval_logits, patch.eval_logits = patch.eval_logits, False     # the evaluation loss only, no logits
    try:
        for batch in heldout:
            batch = batch.to(device)
            out = model(input_ids=batch, labels=batch)            # eval mode, no grad: the token mean
            n = int(out.hardfocus_stats.n_tokens.sum())
            total += out.loss.item() * n
            count += n
    finally:
        patch.eval_logits = eval_logits
        model.train(was_training)
    patch.pop_eval_log_values()   # held-out losses are not training statistics
    return total / max(count, 1)


# -- checkpoints ---------------------------------------------------------------------------

def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, args, log: dict) -> None:
    ckpt = run_dir / "checkpoint"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    state = {"optimizer": optimizer.state_dict(), "args": vars(args), "log": log,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    tmp = ckpt / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(ckpt / "state.pt")   # a crash mid-save leaves the previous state intact


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoint" / "state.pt"
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint in {run_dir} (expected {path})")
    return torch.load(path, weights_only=False)


# -- the loop ------------------------------------------------------------------------------

def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) the loop; returns the log that is also written to ``log.json``."""
    from tqdm.auto import tqdm

    from .plots import plot_run

    run_dir = Path(args.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = None
    if args.resume:
        state = load_checkpoint(run_dir)
        saved = {k: v for k, v in state["args"].items() if k not in _RESUMED_FROM_COMMAND_LINE}
        args = argparse.Namespace(**{**vars(args), **saved})
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(args, device, run_dir / "checkpoint" if state else None)
    apply_hardfocus(model, method=args.method, r=args.r, n1=args.n1, n2=args.n2, impl=args.impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    heldout, stream = data_streams(args, tokenizer)

    if state is None:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        log = {"args": vars(args), "heldout_before": heldout_loss(model, heldout, device), "steps": []}
    else:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        log = state["log"]
        log["args"]["num_batches"] = args.num_batches
    done = len(log["steps"])
    stream = itertools.islice(stream, done, args.num_batches)   # skip what the checkpoint has seen
    print(f"held-out loss before training: {log['heldout_before']:.4f}")

    model.train()
    bar = tqdm(stream, total=args.num_batches, initial=done, disable=args.quiet, desc=f"{args.method}")
    for step, batch in enumerate(bar, start=done + 1):
        batch = batch.to(device)
        start = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        stats = out.hardfocus_stats
        values = {k.split("/")[1]: v for k, v in hardfocus_patch(model).pop_log_values().items()}
        record = {"step": step, "loss": out.loss.item(), **values,
                  "tokens_per_s": int(stats.n_tokens.sum()) / seconds, "peak_memory_mb": peak_memory_mb(device),
                  "weights": stats.weights.tolist(), "seq_loss": stats.seq_loss.tolist()}
        log["steps"].append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", max_w=f"{record.get('max_weight', 0):.2f}",
                        ess=f"{record.get('ess', 0):.1f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if step % args.save_every == 0 or step == args.num_batches:
            save_checkpoint(run_dir, model, tokenizer, optimizer, args, log)
    bar.close()

    log["heldout_after"] = heldout_loss(model, heldout, device)
    print(f"held-out loss after {len(log['steps'])} batches ({args.method}): {log['heldout_after']:.4f}")
    save_checkpoint(run_dir, model, tokenizer, optimizer, args, log)
    final = run_dir / "model"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (run_dir / "log.json").write_text(json.dumps(log, indent=1))
    plot_run(log, run_dir / "training.png")
    print(f"saved the model to {final}, the log to {run_dir / 'log.json'}, the plot to {run_dir / 'training.png'}")
    return log


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
