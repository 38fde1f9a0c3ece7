"""Hugging Face integration: ``apply_hardfocus(model)`` for any causal LM, one mechanism.

Every Hugging Face causal LM computes its training loss the same way: the backbone gives
the final hidden states, ``self.lm_head`` turns them into logits, optional elementwise
post-processing follows (Gemma-2's soft-capping, Cohere's or Granite's logit scaling), and
``self.loss_function(logits, labels, ...)`` scores them.  The patch keeps the model's own
``forward`` (so every kwarg, cache, gradient-checkpointing and MoE auxiliary-loss path is
the model's) and intercepts the two ends on the model *instance*:

- when ``labels`` are passed, ``lm_head`` computes :func:`hardfocus_loss` from the hidden
  states it is given, its weight and bias, the labels and the post-processing (which the
  patch measured at patch time), and returns an empty ``(..., 0)`` tensor instead of the
  logits, so the post-processing costs nothing and no ``[tokens x vocab]`` tensor exists;
- ``loss_function`` checks that it was given the same labels and returns that loss.

The loss is computed inside ``lm_head``'s own call because that is where the head's weight
is guaranteed to be whole: FSDP (1 and 2) gathers a sharded ``lm_head`` in the module's
pre-forward hook and frees it after the forward (DeepSpeed ZeRO-3 uses the same kind of
hooks; not tested here).  The empty tensor depends on the loss and ``loss_function`` adds
its (zero) sum, so the backward passes through ``lm_head``'s output and the wrapper's
pre-backward hook gathers the weight again before the loss's own backward runs; the
gradient reaches the hidden states ``lm_head`` was given, where the wrapper's
post-backward hook reduces the weight's gradient.

At patch time a probe (a few no-grad forwards on 8 random tokens) measures the
post-processing: the logits the model returns must equal ``softcap(scale * lm_head(h))``
with the architecture's ``final_logit_softcapping`` and a fitted constant ``scale``, also
with the logits driven far into the soft-capping range, and the patched loss must equal the
unpatched model's loss.  An architecture whose forward does anything else (another head, a
loss computed without ``loss_function``, a non-elementwise transform of the logits) fails
the probe and is refused with a ``ValueError``, never trained on a wrong loss.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from . import _validation as check
from ._tokens import document_starts, shift_targets
from .loss import HardFocusStats, hardfocus_loss

_ATTRIBUTE = "_hardfocus_patch"


@dataclass
class _Call:
    """What one patched forward call needs to know besides the loss-function arguments."""

    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    logits_to_keep: int | torch.Tensor
    head_calls: int = 0
    loss: torch.Tensor | None = None          # computed by lm_head
    stats: HardFocusStats | None = None
    loss_returned: bool = False


class HardFocusPatch:
    """The state of one patched model: options, the originals to restore, the last stats.

    Reached as ``hardfocus_patch(model)``.  ``last_stats`` is the :class:`HardFocusStats` of
    the latest loss; ``pop_log_values()`` returns the averages of the logged statistics
    since it was last called (what :class:`HardFocusCallback` adds to the Trainer's logs).
    """

    def __init__(self, model: nn.Module, head: nn.Linear, options: dict) -> None:
        self.model, self.head, self.options = model, head, options
        config = getattr(model, "config", None)
        self.softcap = _config_value(config, "final_logit_softcapping")
        self.scale = 1.0
        self.mode = "loss"            # "loss": capture the hidden states; "probe"/"off": see head_forward
        self.probe_gain = 1.0         # probe mode: lm_head sees its input times this
        self.probe_raw = None
        self.call: _Call | None = None
        self.last_stats: HardFocusStats | None = None
        # The factor the Trainer multiplies the loss by (set by AccumulationCallback).
        self.trainer_loss_scale: int | None = None
        self._log_sums: dict[str, torch.Tensor] = {}
        self._log_count = 0
        self._forward = model.forward
        self._head_forward = head.forward
        self._had_loss_function = "_loss_function" in vars(model)
        self._loss_function = model.loss_function if hasattr(model, "loss_function") else None
        self._signature = inspect.signature(model.forward)
        self._var_kwargs = next((p.name for p in self._signature.parameters.values()
                                 if p.kind == inspect.Parameter.VAR_KEYWORD), None)

    # -- installed on the instance -------------------------------------------------------

    def patched_forward(self, *args, **kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get(self._var_kwargs, {}) if self._var_kwargs else {}
        labels = bound.get("labels", extra.get("labels"))
        if labels is None or self.mode == "off":
            return self._forward(*args, **kwargs)
        def argument(name, default=None):
            return bound.get(name, extra.get(name, default))

        self.call = _Call(labels=labels, shift_labels=argument("shift_labels"),
                          position_ids=argument("position_ids"), logits_to_keep=argument("logits_to_keep", 0))
        try:
            out = self._forward(*args, **kwargs)
            if not self.call.loss_returned:
                raise RuntimeError(f"{type(self.model).__name__}.forward did not compute its loss through "
                                   f"self.loss_function, so hardfocus cannot compute it; remove_hardfocus(model)")
        finally:
            self.call = None
        return _without_logits(out, self.last_stats)

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call is not None and self.mode == "loss":
            call.head_calls += 1
            if call.head_calls > 1:
                raise RuntimeError(f"lm_head ran more than once in one forward of {type(self.model).__name__}; "
                                   f"hardfocus supports exactly one")
            call.loss, call.stats = self.compute(hidden, call.labels, call.shift_labels, call.position_ids,
                                                 call.logits_to_keep)
            # Stands in for the logits: empty, but downstream of the loss, so the backward
            # runs through this call's output (and any FSDP pre-backward hook on it).
            return call.loss.to(hidden.dtype).reshape((1,) * hidden.dim()).expand(*hidden.shape[:-1], 0)
        if self.mode == "probe":
            self.probe_raw = self._head_forward(hidden * self.probe_gain)
            return self.probe_raw
        return self._head_forward(hidden)

    def loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        call = self.call
        if call is None:   # called from outside a patched forward: behave as before
            return self._loss_function(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                       ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        name = type(self.model).__name__
        if call.loss is None:
            raise RuntimeError(f"{name}.forward called loss_function without running lm_head; hardfocus cannot "
                               f"compute its loss")
        if ignore_index != -100:
            raise ValueError(f"{name}.forward passed ignore_index={ignore_index} to loss_function; hardfocus "
                             f"computes the loss with -100")
        for what, given, expected in (("labels", labels, call.labels), ("shift_labels", shift_labels,
                                                                         call.shift_labels)):
            if not _same(given, expected):
                raise ValueError(f"{name}.forward passed loss_function other {what} than it was called with; "
                                 f"hardfocus computes the loss from the {what} given to the model")
        # logits is the empty stand-in (after the model's post-processing): adding its sum
        # (0) keeps lm_head's output on the backward path.
        loss, stats = call.loss + logits.sum().to(call.loss.dtype), call.stats
        if num_items_in_batch is not None:
            loss = loss * self._trainer_factor(stats, num_items_in_batch)
        call.loss_returned = True
        self._record(stats)
        return loss

    def _trainer_factor(self, stats: HardFocusStats, num_items_in_batch) -> torch.Tensor | float:
        """What turns this micro-batch's loss into the one the ``transformers.Trainer`` expects.

        The Trainer passes ``num_items_in_batch`` (the step's target count: over all ranks
        when ``average_tokens_across_devices``, the default, else this rank's), sums the
        micro-batch losses of a step without dividing by their number, and multiplies the
        loss by the world size when it averages tokens across devices; DDP then averages
        the gradients.  So:

        - built-in methods, no group: each micro-batch's loss is weighted by its share of
          the step's targets (``method="mean"`` is then exactly the Trainer's own loss);
        - built-in methods with ``group``: the loss (already ``world * local share``) is
          weighted by the group's micro-batch targets over the sum of every rank's
          ``num_items_in_batch``, which is right in both Trainer modes: ``world * N_step``
          when the Trainer then multiplies by ``world``, ``N_step`` when it does not;
        - a weighting rule (``AccumulatedIRDRO``, ``TwoPassRanking``) normalises over the
          step itself; only the Trainer's multiplication is undone, which
          :class:`~hardfocus_fused.hf_trainer.AccumulationCallback` reads from its arguments.
        """
        if callable(self.options["method"]):
            scale = self.trainer_loss_scale
            if scale is None:
                if _world_size() > 1:
                    raise ValueError("a weighting rule (method=AccumulatedIRDRO/TwoPassRanking) under a multi-process "
                                     "Trainer needs hardfocus_fused.hf_trainer.AccumulationCallback, which reads how "
                                     "the Trainer scales the loss")
                scale = 1
            return 1.0 / scale
        n_tokens = stats.n_tokens.sum()
        group = self.options.get("group")
        if group is None:
            return n_tokens / num_items_in_batch
        counts = torch.stack([n_tokens.to(torch.float64),
                              torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=n_tokens.device)])
        torch.distributed.all_reduce(counts, group=group)
        return (counts[0] / counts[1]).float()

    # -- the loss ------------------------------------------------------------------------

    def compute(self, hidden, labels, shift_labels, position_ids, logits_to_keep, ignore_index=-100,
                **overrides) -> tuple[torch.Tensor, HardFocusStats]:
        """``hardfocus_loss`` of the hidden states ``lm_head`` was given, with the options."""
        labels = labels.to(hidden.device)
        if position_ids is not None:
            position_ids = position_ids.to(hidden.device).expand(labels.shape)
        if shift_labels is not None:
            targets = shift_labels.to(hidden.device)
        else:
            starts = document_starts(position_ids) if position_ids is not None else None
            targets = shift_targets(labels, ignore_index, starts)
        targets, position_ids = _keep_positions(targets, position_ids, logits_to_keep)
        if targets.shape != hidden.shape[:2]:
            raise ValueError(f"labels give targets of shape {tuple(targets.shape)} but lm_head saw hidden states "
                             f"of shape {tuple(hidden.shape[:2])}")
        weight, bias = self.head.weight, self.head.bias
        if _is_dtensor(weight):
            raise ValueError(f"{type(self.model).__name__}.lm_head's weight is a DTensor inside lm_head's own "
                             f"forward (tensor parallel?); hardfocus needs the whole weight there, as FSDP "
                             f"provides")
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = bias * self.scale if bias is not None else None
        options = dict(self.options, **overrides)
        return hardfocus_loss(hidden, weight, targets, bias=bias, shift=False, position_ids=position_ids,
                              softcap=self.softcap, ignore_index=ignore_index, return_stats=True, **options)

    @contextlib.contextmanager
    def options_for(self, **overrides):
        """Temporarily change loss options, e.g. ``method="mean"`` for a held-out loss."""
        saved = self.options
        self.options = dict(saved, **overrides)
        try:
            yield self
        finally:
            self.options = saved

    # -- logging -------------------------------------------------------------------------

    def _record(self, stats: HardFocusStats) -> None:
        # Running sums of 0-dim tensors: no host sync until the values are logged.
        self.last_stats = stats
        for key, value in log_tensors(stats).items():
            self._log_sums[key] = self._log_sums.get(key, 0.0) + value
        self._log_count += 1

    def pop_log_values(self) -> dict[str, float]:
        """Averages of :func:`log_values` over the losses since the previous call."""
        values = {k: (v / self._log_count).item() for k, v in self._log_sums.items()} if self._log_count else {}
        self._log_sums, self._log_count = {}, 0
        return values

    # -- install / remove ----------------------------------------------------------------

    def install(self) -> None:
        # A partial of a bound method, not a closure: ``copy.deepcopy(model)`` then yields a
        # copy whose forward runs the copied patch on the copied weights.  ``wraps`` keeps
        # the model's signature, which the Trainer inspects.
        self.model.forward = functools.wraps(self._forward)(functools.partial(self.patched_forward))
        self.head.forward = self.head_forward
        if self._loss_function is not None:
            self.model.loss_function = self.loss_function
        setattr(self.model, _ATTRIBUTE, self)

    def uninstall(self) -> None:
        for module in (self.model, self.head):
            vars(module).pop("forward", None)
        if self._had_loss_function:
            self.model.loss_function = self._loss_function
        else:
            vars(self.model).pop("_loss_function", None)
        vars(self.model).pop(_ATTRIBUTE, None)


def log_tensors(stats: HardFocusStats) -> dict[str, torch.Tensor]:
    """The statistics worth logging per step, as 0-dim tensors (no host sync): max weight,
    effective sample size ``1 / sum w^2``, and the mean, max and weighted sequence loss
    over the sequences that have targets (all 0 for a batch without any)."""
    live = stats.n_tokens > 0
    w = stats.weights.float()
    seq = stats.seq_loss.float()
    n_live = live.sum().clamp_min(1)
    return {
        "hardfocus/max_weight": w.max(),
        "hardfocus/ess": torch.where(live.any(), 1.0 / (w * w).sum().clamp_min(1e-30), 0.0),
        "hardfocus/seq_loss_mean": (seq * live).sum() / n_live,
        "hardfocus/seq_loss_max": torch.where(live, seq, 0.0).max(),
        "hardfocus/weighted_loss": (w * seq).sum(),
    }


def log_values(stats: HardFocusStats) -> dict[str, float]:
    """:func:`log_tensors` as Python floats."""
    return {key: value.item() for key, value in log_tensors(stats).items()}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _same(given: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    """Whether loss_function got the tensor the model was called with (maybe moved)."""
    if given is None or expected is None or given is expected:
        return given is expected
    return given.shape == expected.shape and torch.equal(given.to(expected.device), expected)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (e.g. a tensor-parallel weight)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def _config_value(config, name: str):
    """``config.name``, looking into ``text_config`` for multimodal configs."""
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value is not None:
            return value
    return None


def _keep_positions(targets, position_ids, logits_to_keep):
    """Targets (and position ids) of the positions ``logits_to_keep`` gives to lm_head."""
    if isinstance(logits_to_keep, int):
        index = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
    elif isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
        index = logits_to_keep.to(targets.device)
    else:
        raise ValueError("with labels, logits_to_keep must be an int or a 1-D tensor of positions")
    kept = targets[:, index]
    return kept, position_ids[:, index] if position_ids is not None else None


def _without_logits(out, stats: HardFocusStats | None):
    """The model's output with ``logits=None`` and the weighting's stats attached."""
    if isinstance(out, tuple):   # return_dict=False: (loss, logits, ...)
        return (out[0],) + out[2:]
    fields = {k: v for k, v in out.items() if k != "logits"}
    new = type(out)(**fields)
    # A plain attribute, not a ModelOutput key: tuple conversion and the Trainer's
    # prediction loop see exactly the model's own outputs.
    object.__setattr__(new, "hardfocus_stats", stats)
    return new


def _wrapper_types() -> tuple[type, ...]:
    """``DistributedDataParallel`` and FSDP1's ``FullyShardedDataParallel``: modules that
    hold the module they run as ``.module``."""
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.fsdp import FullyShardedDataParallel
    return nn.parallel.DistributedDataParallel, FullyShardedDataParallel


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT, DDP and FSDP1 wrappers (FSDP2 wraps nothing)."""
    while True:
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and hasattr(model, "peft_config"):
            model = get_base()
        elif isinstance(model, _wrapper_types()):
            model = model.module
        else:
            return model


def _linear_head(model: nn.Module) -> nn.Linear:
    """``model``'s output embeddings as the ``nn.Linear`` whose ``forward`` computes the
    logits (inside an FSDP1 wrapper, the wrapped one: the wrapper gathers its weight)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head): not a causal LM")
    head = _unwrap(head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}'s lm_head is a {type(head).__name__}, not nn.Linear "
                        f"(LoRA or another adapter on the head?); apply_hardfocus needs a plain linear head")
    return head


def hardfocus_patch(model: nn.Module) -> HardFocusPatch | None:
    """The :class:`HardFocusPatch` of a patched model (or of a patched module inside it)."""
    for module in model.modules():
        patch = vars(module).get(_ATTRIBUTE)
        if patch is not None:
            return patch
    return None


def apply_hardfocus(
    model: nn.Module,
    *,
    method: str = "irdro",
    r: float = 10.0,
    n1: float = 0.25,
    n2: float = 0.25,
    seq_reduction: str = "mean",
    impl: str = "auto",
    deterministic: bool | None = None,
    group=None,
    verify: bool = True,
) -> nn.Module:
    """Make ``model`` (a Hugging Face causal LM, or a PEFT model around one) train on the
    sample-reweighted loss, computed by the fused kernels without logits.

    With ``labels`` the patched forward returns ``loss = hardfocus_loss(...)`` and
    ``logits=None``, and the output carries ``hardfocus_stats`` (a :class:`HardFocusStats`:
    per-sequence losses, weights and token counts).  Without labels (generation,
    inference) the model behaves exactly as before.  Only this instance is patched.

    ``position_ids`` with resets to 0 (``DataCollatorWithFlattening``) make each packed
    document a sequence of the weighting.  Under the Trainer with gradient accumulation
    (``num_items_in_batch``), each micro-batch's weighted loss is scaled by its share of the
    step's target tokens, so ``method="mean"`` gives exactly the standard loss and the
    weighted methods weight sequences within each micro-batch (over all ranks of
    ``group``); a weighting rule from ``hardfocus_fused.accumulate`` weighs the whole
    step (see ``HardFocusPatch._trainer_factor``).

    The model may be patched before or after it is wrapped in DDP or FSDP (1 or 2), and
    ``lm_head`` may be sharded as its own FSDP unit: the loss is computed inside
    ``lm_head``'s call, where the wrapper has gathered its weight.

    Args:
        model: the model to patch (or a PEFT, DDP or FSDP1 wrapper around it); returned,
            patched in place.
        method, r, n1, n2, seq_reduction, impl, deterministic, group: as for
            :func:`hardfocus_loss` (``group``: weights over a data-parallel group's global
            batch).
        verify: run the patch-time probe (a few no-grad forwards on 8 random tokens) that
            measures the logit post-processing and refuses architectures it cannot match.

    Raises:
        TypeError: ``lm_head`` is not an ``nn.Linear`` (e.g. LoRA applied to the head).
        ValueError: not a causal LM, or the probe found logits the patch cannot reproduce.
    """
    check.check_weighting(method, r, n1, n2, seq_reduction)
    check.check_choice("impl", impl, check.IMPLS)
    target = _unwrap(model)
    if hardfocus_patch(target) is not None:
        remove_hardfocus(target)
    config = getattr(target, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(target).__name__} is an encoder-decoder model; apply_hardfocus patches causal LMs")
    head = _linear_head(target)
    if not hasattr(target, "loss_function"):
        raise ValueError(f"{type(target).__name__} has no loss_function; apply_hardfocus needs a transformers "
                         f"causal LM that computes its loss through self.loss_function")
    options = dict(method=method, r=r, n1=n1, n2=n2, seq_reduction=seq_reduction, impl=impl,
                   deterministic=deterministic, group=group)
    patch = HardFocusPatch(target, head, options)
    patch.install()
    if verify:
        try:
            from .hf_probe import probe
            probe(patch, model)   # through the wrappers, which gather sharded weights
        except Exception:
            patch.uninstall()
            raise
    return model


def remove_hardfocus(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_hardfocus`; a model that is not patched is returned unchanged."""
    patch = hardfocus_patch(_unwrap(model))
    if patch is not None:
        patch.uninstall()
    return model
