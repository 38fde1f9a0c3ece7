"""``HardFocusPatch``: the state of one patched model and the three methods it installs on
the instance (``forward``, ``lm_head.forward``, ``loss_function``), plus the guards that
turn a bypassed or broken patch into a clear error.  See ``hardfocus_fused.hf`` for the mechanism."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..loss import HardFocusStats, hardfocus_loss
from ..options import HardFocusOptions
from .loss import batch_options, call_targets, token_mean, trainer_factor
from .parts import find_linear_head
from .stats_log import StatsLog

ATTRIBUTE = "_hardfocus_patch"
# Batch columns the patched forward takes (and the model never sees): per-token and
# per-row weights of the data (see hardfocus_loss's token_weight and sample_weight).
DATA_COLUMNS = ("token_weight", "sample_weight")

BYPASS_HELP = (
    "The transformers Trainer removes the labels from the model call when label_smoothing_factor > 0 (call "
    "HardFocusCallback.attach(trainer), which moves the label smoothing into the fused loss) or a "
    "compute_loss_func is set (drop it); TRL's SFTTrainer computes its own loss with its own fused head (use "
    "hardfocus_fused.hf.trl.HardFocusSFTTrainer).  To compute a loss of your own from the logits, call "
    "remove_hardfocus(model) or run inside `with hardfocus_patch(model).disabled():`."
)


def hardfocus_patch(model: nn.Module) -> HardFocusPatch | None:
    """The :class:`HardFocusPatch` of a patched model (or of a patched module inside it)."""
    for module in model.modules():
        patch = vars(module).get(ATTRIBUTE)
        if patch is not None:
            return patch
    return None


@dataclass
class _Call:
    """What one patched forward call needs to know besides the loss-function arguments."""

    labels: torch.Tensor
    shift_labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    logits_to_keep: int | torch.Tensor
    evaluating: bool  # no grad, eval mode: plain loss, logits kept if eval_logits
    token_weight: torch.Tensor | None = None  # the batch's weight columns (DATA_COLUMNS)
    sample_weight: torch.Tensor | None = None
    head_calls: int = 0
    loss: torch.Tensor | None = None  # computed by lm_head
    stats: HardFocusStats | None = None
    standin: torch.Tensor | None = None  # what loss_function got instead of the logits
    loss_returned: bool = False


def _patched_forward(owner, *args, **kwargs):
    """The ``forward`` installed on a patched model: its patch's ``patched_forward``.

    Installed as a per-model copy of this function (same code, the model's own signature:
    see ``HardFocusPatch.forward_method``) bound to the patch.  ``owner`` is the patch, or
    the model when accelerate's ``unwrap_model(keep_fp32_wrapper=False)`` has rebound the
    innermost function of ``forward`` to the model."""
    patch = owner if isinstance(owner, HardFocusPatch) else getattr(owner, ATTRIBUTE)
    return patch.patched_forward(*args, **kwargs)


def _with_columns(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` (of the model's bound forward) with ``self`` first and the batch's
    weight columns, keyword-only before any ``**kwargs`` (the Trainer keeps the dataset
    columns the forward's signature names)."""
    receiver = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [receiver, *signature.parameters.values()]
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    columns = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
        for name in DATA_COLUMNS
        if name not in signature.parameters
    ]
    return signature.replace(parameters=params[:at] + columns + params[at:])


class HardFocusPatch:
    """The state of one patched model: options, the originals to restore, the last stats.

    Reached as ``hardfocus_patch(model)``.  ``last_stats`` is the :class:`HardFocusStats` of
    the latest loss; ``pop_log_values()`` and ``pop_eval_log_values()`` return the averages
    of the logged statistics of training and of evaluation calls since they were last
    called (what :class:`HardFocusCallback` adds to the Trainer's logs).  ``eval_logits``
    (settable) says whether evaluation calls return the logits.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Linear,
        backbone: nn.Module | None,
        options: HardFocusOptions,
        eval_logits: bool = True,
    ) -> None:
        self.model, self.head, self.backbone, self.options = model, head, backbone, options
        self.eval_logits = eval_logits
        self.softcap = _config_value(getattr(model, "config", None), "final_logit_softcapping")
        self.scale = 1.0
        self.mode = "loss"  # "loss": compute the loss; "probe" (see hf.probe); "off": the model's own
        self.probe_gain = 1.0  # probe mode: lm_head sees its input times this
        self.probe_raw = None
        self.call: _Call | None = None
        self.last_stats: HardFocusStats | None = None
        # The factor the Trainer multiplies the loss by (set by AccumulationCallback).
        self.trainer_loss_scale: int | None = None
        self.train_log, self.eval_log = StatsLog(), StatsLog()
        # What the patch replaces: a forward set on the instance before (None: the class's).
        self._own_forward = vars(model).get("forward")
        self._own_head_forward = vars(head).get("forward")
        self._had_loss_function = "_loss_function" in vars(model)
        self._loss_function = model.loss_function if hasattr(model, "loss_function") else None
        self._guard = None

    @property
    def name(self) -> str:
        return type(self.model).__name__

    # -- the model's own forward and head, and the installed forward ----------------------

    def _forward(self, *args, **kwargs):
        """The model's forward as it was before the patch."""
        if self._own_forward is not None:
            return self._own_forward(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def _head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head``'s forward as it was before the patch."""
        if self._own_head_forward is not None:
            return self._own_head_forward(hidden)
        return type(self.head).forward(self.head, hidden)

    @functools.cached_property
    def _signature(self) -> inspect.Signature:
        """The signature of the model's own forward (bound: without ``self``)."""
        if self._own_forward is not None:
            return inspect.signature(self._own_forward)
        return inspect.signature(types.MethodType(type(self.model).forward, self.model))

    @functools.cached_property
    def _var_kwargs(self) -> str | None:
        return next(
            (p.name for p in self._signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD), None
        )

    def forward_method(self):
        """The ``forward`` installed on the model: a copy of ``_patched_forward`` carrying the
        model's signature (with the weight columns), bound to this patch.

        A bound method of the patch survives what training stacks do to ``model.forward``:
        ``copy.deepcopy`` rebinds it to the copied patch (of the copied model); accelerate's
        ``unwrap_model(keep_fp32_wrapper=False)`` rebinds the copy to the model, which
        ``_patched_forward`` accepts; pickling stores it as ``getattr(patch,
        "_hardfocus_forward")``, which rebuilds it for the reloaded model; and being a plain
        function with source, ``torch.compile`` traces it."""
        function = types.FunctionType(
            _patched_forward.__code__,
            _patched_forward.__globals__,
            "_hardfocus_forward",
            _patched_forward.__defaults__,
            _patched_forward.__closure__,
        )
        function.__qualname__ = f"{self.name}.forward"
        function.__doc__ = getattr(type(self.model).forward, "__doc__", None)
        function.__signature__ = _with_columns(self._signature)
        return types.MethodType(function, self)

    @property
    def _hardfocus_forward(self):
        """What a pickled model's installed forward is restored from (see ``forward_method``)."""
        return self.forward_method()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for derived in ("_signature", "_var_kwargs"):  # recomputed after loading
            state.pop(derived, None)
        return state

    # -- installed on the instance -------------------------------------------------------

    def patched_forward(self, *args, **kwargs):
        columns = {name: kwargs.pop(name) for name in DATA_COLUMNS if name in kwargs}  # never the model's
        if self.mode == "off":
            return self._forward(*args, **kwargs)
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get(self._var_kwargs, {}) if self._var_kwargs else {}

        def argument(name, default=None):
            return bound.get(name, extra.get(name, default))

        labels = argument("labels")
        if labels is None:  # inference, generation; a backward through it is refused (backbone_guard)
            return self._forward(*args, **kwargs)
        self._check_head()
        self.call = _Call(
            labels=labels,
            shift_labels=argument("shift_labels"),
            position_ids=argument("position_ids"),
            attention_mask=argument("attention_mask"),
            logits_to_keep=argument("logits_to_keep", 0),
            evaluating=not self.model.training and not torch.is_grad_enabled(),
            **columns,
        )
        try:
            out = self._forward(*args, **kwargs)
            if not self.call.loss_returned:
                raise ValueError(
                    f"{self.name}.forward did not compute its loss through self.loss_function, so "
                    f"hardfocus cannot compute it.  {BYPASS_HELP}"
                )
            return self._output(out)
        finally:
            self.call = None

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call is not None and self.mode == "loss":
            call.head_calls += 1
            if call.head_calls > 1:
                raise RuntimeError(
                    f"lm_head ran more than once in one forward of {self.name}; hardfocus supports exactly one"
                )
            options = batch_options(self.options) if call.evaluating else self.options
            call.loss, call.stats = self.compute(hidden, call, options)
            if call.evaluating and self.eval_logits:
                return self._head_forward(hidden)
            # Stands in for the logits: empty, but downstream of the loss, so the backward
            # runs through this call's output (and any FSDP pre-backward hook on it).
            return call.loss.to(hidden.dtype).reshape((1,) * hidden.dim()).expand(*hidden.shape[:-1], 0)
        if self.mode == "probe":
            self.probe_raw = self._head_forward(hidden * self.probe_gain)
            return self.probe_raw
        return self._head_forward(hidden)

    def loss_function(
        self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
    ):
        call = self.call
        if call is None:  # called from outside a patched forward: behave as before
            return self._loss_function(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        if call.loss is None:
            raise RuntimeError(
                f"{self.name}.forward called loss_function without running lm_head; hardfocus cannot compute its loss"
            )
        if ignore_index != -100:
            raise ValueError(
                f"{self.name}.forward passed ignore_index={ignore_index} to loss_function; hardfocus "
                f"computes the loss with -100"
            )
        for what, given, expected in (
            ("labels", labels, call.labels),
            ("shift_labels", shift_labels, call.shift_labels),
        ):
            if not _same(given, expected):
                raise ValueError(
                    f"{self.name}.forward passed loss_function other {what} than it was called with; "
                    f"hardfocus computes the loss from the {what} given to the model"
                )
        call.loss_returned = True
        call.standin = logits  # the stand-in (after the model's post-processing), or real logits in evaluation
        stats = call.stats
        if call.evaluating:
            # Evaluation reports the plain token-mean loss, comparable across methods; the
            # weighted one goes to the eval log (HardFocusCallback: eval_hardfocus/...).
            self.eval_log.record(stats)
            return token_mean(stats, self.options.weighting.seq_reduction)
        # Adding the stand-in's sum (0) keeps lm_head's output on the backward path.
        loss = call.loss + logits.sum().to(call.loss.dtype)
        if num_items_in_batch is not None:
            weighting = self.options.weighting
            loss = loss * trainer_factor(
                stats, num_items_in_batch, weighting.method, weighting.group, self.trainer_loss_scale
            )
        self.train_log.record(stats)
        return loss

    def backbone_guard(self, module, args, kwargs, output) -> None:
        """Forward hook on the backbone.  Its hidden states reach a loss other than the
        patched one when the backbone runs with grad outside a labelled patched forward: a
        forward without labels (the Trainer's label smoothing or ``compute_loss_func``), or
        the backbone called directly (TRL's own fused head).  Such hidden states get a
        gradient hook that refuses the backward, so the model never silently trains
        unweighted; inference on them (no backward) is untouched."""
        if self.call is not None or self.mode != "loss" or not torch.is_grad_enabled():
            return
        hidden = output[0] if isinstance(output, (tuple, dict)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            cause = trainer_bypass()  # read now: the backward may run on another thread
            hidden.register_hook(lambda grad: self._refuse_backward(cause))

    def _refuse_backward(self, cause: str | None):
        if cause is not None:
            raise ValueError(f"{self.name} is patched by apply_hardfocus, but {cause}")
        raise ValueError(
            f"a loss computed outside the hardfocus patch is being backpropagated through "
            f"{self.name} (patched by apply_hardfocus): the model would train on it instead of the "
            f"sample-reweighted loss.  {BYPASS_HELP}"
        )

    # -- the loss ------------------------------------------------------------------------

    def compute(
        self, hidden: torch.Tensor, call: _Call, options: HardFocusOptions
    ) -> tuple[torch.Tensor, HardFocusStats]:
        """``hardfocus_loss`` of the hidden states ``lm_head`` was given, with ``options``
        and what the model defines (its soft-capping, labels already aligned by
        ``call_targets``, -100 ignored, the stats returned)."""
        where = call_targets(
            call.labels,
            call.shift_labels,
            call.position_ids,
            call.attention_mask,
            call.logits_to_keep,
            hidden.device,
            token_weight=call.token_weight,
        )
        if where.targets.shape != hidden.shape[:2]:
            raise ValueError(
                f"labels give targets of shape {tuple(where.targets.shape)} but lm_head saw hidden "
                f"states of shape {tuple(hidden.shape[:2])}"
            )
        weight, bias = self.head.weight, self.head.bias
        if _is_dtensor(weight):
            raise ValueError(
                f"{self.name}.lm_head's weight is a DTensor inside lm_head's own forward (tensor "
                f"parallel?); hardfocus needs the whole weight there, as FSDP provides"
            )
        if self.scale != 1.0:
            hidden = hidden * self.scale
            bias = bias * self.scale if bias is not None else None
        options = options.replace(softcap=self.softcap, shift=0, ignore_index=-100, return_stats=True)
        sample_weight = call.sample_weight.to(hidden.device).float() if call.sample_weight is not None else None
        return hardfocus_loss(
            hidden,
            weight,
            where.targets,
            bias=bias,
            shift=False,
            position_ids=where.position_ids,
            attention_mask=where.attention_mask if where.position_ids is not None else None,
            token_weight=where.token_weight,
            sample_weight=sample_weight,
            options=options,
        )

    @contextlib.contextmanager
    def options_for(self, **overrides):
        """Temporarily change loss options, e.g. ``method="mean"`` for a held-out loss."""
        saved = self.options
        self.options = saved.replace(**overrides)
        try:
            yield self
        finally:
            self.options = saved

    @contextlib.contextmanager
    def disabled(self):
        """Run the model unpatched inside the block (its own logits and loss), e.g. to train
        on a loss of your own for a while."""
        saved, self.mode = self.mode, "off"
        try:
            yield self
        finally:
            self.mode = saved

    # -- logging -------------------------------------------------------------------------

    def pop_log_values(self) -> dict[str, float]:
        """Averages of the training statistics (``hardfocus/...``) since the previous call."""
        return self.train_log.pop()

    def pop_eval_log_values(self) -> dict[str, float]:
        """Averages of the evaluation statistics since the previous call: the weighted loss
        and the weights evaluation batches would get (the reported eval loss is the plain
        token mean)."""
        return self.eval_log.pop()

    # -- guards --------------------------------------------------------------------------

    def _check_head(self) -> None:
        """The model still computes its logits with the head that was patched."""
        try:
            current = find_linear_head(self.model)
        except (TypeError, ValueError) as error:
            current = error
        if current is not self.head:
            raise ValueError(
                f"{self.name}'s lm_head was replaced after apply_hardfocus (by resize_token_embeddings, "
                f"an adapter on the head, or set_output_embeddings): {current!r:.200}.  Call "
                f"apply_hardfocus(model) again after changing the head; LoRA on lm_head is not "
                f"supported (leave it out of target_modules)"
            )

    def _output(self, out):
        """The model's output without the stand-in logits, with the weighting's stats."""
        call = self.call
        self.last_stats = call.stats
        real_logits = call.evaluating and self.eval_logits

        def keep(value):
            return real_logits or value is not call.standin

        if isinstance(out, tuple):  # return_dict=False: the stand-in is dropped wherever it sits
            return tuple(item for item in out if keep(item))
        fields = {k: v for k, v in out.items() if keep(v)}
        new = type(out)(**fields)
        # A plain attribute, not a ModelOutput key: tuple conversion and the Trainer's
        # prediction loop see exactly the model's own outputs.
        object.__setattr__(new, "hardfocus_stats", call.stats)
        return new

    # -- install / remove ----------------------------------------------------------------

    def install(self) -> None:
        setattr(self.model, ATTRIBUTE, self)
        self.model.forward = self.forward_method()
        self.head.forward = self.head_forward
        if self._loss_function is not None:
            self.model.loss_function = self.loss_function
        if self.backbone is not None:
            # A bound method: a deep copy of the model guards with its own patch.
            self._guard = self.backbone.register_forward_hook(self.backbone_guard, with_kwargs=True)

    def uninstall(self) -> None:
        for module, own in ((self.model, self._own_forward), (self.head, self._own_head_forward)):
            vars(module).pop("forward", None)
            if own is not None:
                module.forward = own
        if self._had_loss_function:
            self.model.loss_function = self._loss_function
        else:
            vars(self.model).pop("_loss_function", None)
        if self._guard is not None:
            self._guard.remove()
        vars(self.model).pop(ATTRIBUTE, None)


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


def trainer_bypass() -> str | None:
    """What makes the transformers ``Trainer`` running this forward (found on the call
    stack) compute its loss outside the patch, with the fix, or None when no Trainer is
    running or none of the known settings is on."""
    if "transformers" not in sys.modules:
        return None
    from transformers import Trainer

    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), Trainer):
        frame = frame.f_back
    if frame is None:
        return None
    trainer = frame.f_locals["self"]
    smoothing = getattr(trainer.args, "label_smoothing_factor", 0.0)
    if smoothing:
        return (
            f"the Trainer has label_smoothing_factor={smoothing}, so it calls the model without labels and "
            f"smooths the logits itself: call HardFocusCallback.attach(trainer) (or use HardFocusSFTTrainer), "
            f"which moves the label smoothing into the fused loss"
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        return (
            "the Trainer has a compute_loss_func, which computes the loss from the logits: drop it (the patched "
            "model computes the loss itself)"
        )
    if "trl" in sys.modules and type(trainer).__name__ == "SFTTrainer":
        return (
            "TRL's SFTTrainer computes its own loss: train with hardfocus_fused.hf.trl.HardFocusSFTTrainer, the "
            "same trainer taking the patched model's loss"
        )
    return None
