"""Hugging Face integration: ``apply_hardfocus(model)`` for any causal LM, one mechanism.

Every Hugging Face causal LM computes its training loss the same way: the backbone gives
the final hidden states, ``self.lm_head`` turns them into logits, optional elementwise
post-processing follows (Gemma-2's soft-capping, Cohere's or Granite's logit scaling), and
``self.loss_function(logits, labels, ...)`` scores them.  The patch keeps the model's own
``forward`` (so every kwarg, cache, gradient-checkpointing and MoE auxiliary-loss path is
the model's) and intercepts the two ends on the model *instance*:

- when ``labels`` are passed, ``lm_head`` records the hidden states it is given and
  returns an empty ``(..., 0)`` tensor instead of the logits, so the post-processing costs
  nothing and no ``[tokens x vocab]`` tensor exists;
- ``loss_function`` computes :func:`hardfocus_loss` from the recorded hidden states, the
  head's weight and bias, and the post-processing, which the patch measured at patch time.

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
from dataclasses import dataclass, field

import torch
from torch import nn

from . import _validation as check
from ._tokens import document_starts, shift_targets
from .loss import HardFocusStats, hardfocus_loss

_ATTRIBUTE = "_hardfocus_patch"


@dataclass
class _Call:
    """What one patched forward call needs to know besides the loss-function arguments."""

    position_ids: torch.Tensor | None
    logits_to_keep: int | torch.Tensor
    hidden: list = field(default_factory=list)   # what lm_head was given
    loss_computed: bool = False


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
        self.probe_hidden = self.probe_raw = None
        self.call: _Call | None = None
        self.last_stats: HardFocusStats | None = None
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
        self.call = _Call(position_ids=bound.get("position_ids", extra.get("position_ids")),
                          logits_to_keep=bound.get("logits_to_keep", extra.get("logits_to_keep", 0)))
        try:
            out = self._forward(*args, **kwargs)
            if not self.call.loss_computed:
                raise RuntimeError(f"{type(self.model).__name__}.forward did not compute its loss through "
                                   f"self.loss_function, so hardfocus cannot compute it; remove_hardfocus(model)")
        finally:
            self.call = None
        return _without_logits(out, self.last_stats)

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.call is not None and self.mode == "loss":
            self.call.hidden.append(hidden)
            return hidden.new_empty((*hidden.shape[:-1], 0))   # stands in for the logits
        if self.mode == "probe":
            self.probe_hidden = hidden
            self.probe_raw = self._head_forward(hidden * self.probe_gain)
            return self.probe_raw
        return self._head_forward(hidden)

    def loss_function(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        call = self.call
        if call is None:   # called from outside a patched forward: behave as before
            return self._loss_function(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                       ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if len(call.hidden) != 1:
            raise RuntimeError(f"lm_head ran {len(call.hidden)} times in one forward of "
                               f"{type(self.model).__name__}; hardfocus supports exactly one")
        if num_items_in_batch is not None and self.options.get("group") is not None:
            raise ValueError("apply_hardfocus(group=...) does not combine with the Trainer's num_items_in_batch "
                             "(the Trainer rescales the loss for data parallelism itself); use group=None under "
                             "the Trainer, or call the model without num_items_in_batch")
        loss, stats = self.compute(call.hidden[0], labels, shift_labels, call.position_ids, call.logits_to_keep,
                                   ignore_index)
        if num_items_in_batch is not None and not callable(self.options["method"]):
            # (A weighting rule such as AccumulatedIRDRO normalises over the whole step itself.)
            # The Trainer sums micro-batch losses without dividing by the accumulation steps and
            # expects each one normalised by the whole step's target count: weight each
            # micro-batch's loss by its share of the step's targets.
            loss = loss * (stats.n_tokens.sum() / num_items_in_batch)
        call.loss_computed = True
        self._record(stats)
        return loss

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
            raise ValueError(f"{type(self.model).__name__}.lm_head is sharded as its own FSDP unit, so its weight is "
                             f"not gathered when the loss is computed; shard lm_head together with the enclosing "
                             f"module (no separate fully_shard(model.lm_head))")
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


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a sharded ``DTensor`` (FSDP2 parameters outside their unit's forward)."""
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


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
    weighted methods weight sequences within each micro-batch.

    Args:
        model: the model to patch; returned, patched in place.
        method, r, n1, n2, seq_reduction, impl, deterministic, group: as for
            :func:`hardfocus_loss` (``group``: weights over a data-parallel group's global
            batch, for training loops that do not pass ``num_items_in_batch``).
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
    get_head = getattr(target, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(f"{type(target).__name__} has no output embeddings (lm_head): not a causal LM")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(target).__name__}'s lm_head is a {type(head).__name__}, not nn.Linear "
                        f"(LoRA or another adapter on the head?); apply_hardfocus needs a plain linear head")
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
            probe(patch)
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
