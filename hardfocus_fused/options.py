"""What a loss is, as frozen option objects validated once, when they are built.

- :class:`CrossEntropy`: the per-token loss (ignored label, label smoothing, class
  weights, z-loss, soft-capping, temperature);
- :class:`Returns`: what :func:`~hardfocus_fused.linear_cross_entropy` returns besides
  the loss;
- :class:`Weighting`: how the sequences of a batch are weighted (the paper's methods and
  their parameters, the per-sequence reduction, the data-parallel group);
- :class:`Execution`: how it runs (implementation, backward strategy, determinism, the
  label check);
- :class:`LCEOptions` (for ``linear_cross_entropy``) and :class:`HardFocusOptions` (for
  ``hardfocus_loss``, ``HardFocusLoss``, ``apply_hardfocus``, the Trainer and TRL
  integration and the CLI) combine them and refuse, when built, every combination that
  cannot run: an accepted object never raises later in a forward or backward for its
  options (``tests/loss/test_options.py`` walks the grid).

Every entry point also takes the fields as keyword arguments, the convenient form:
``hardfocus_loss(h, w, y, method="midranking", label_smoothing=0.1)`` builds
``HardFocusOptions.build(method="midranking", label_smoothing=0.1)``.  A mistake raises a
``ValueError``/``TypeError`` naming the option.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .weighting.methods import METHODS, SEQ_REDUCTIONS

IMPLS = ("auto", "triton", "torch")
BACKWARD_IMPLS = ("auto", "fused", "matmul", "forward")
REDUCTIONS = ("none", "sum", "mean")

FORWARD_ONLY_WHEN_KNOWN = (
    "backward_impl='forward' forms the gradients in the forward pass, which needs every token's weight in the "
    "loss before it: linear_cross_entropy with reduction='mean' or 'sum' (and no return_* option), or "
    "hardfocus_loss with method='mean' or 'uniform' and no group or sequence_group; not with class_weight and "
    "lse_square_scale together (their parts have different denominators); per-token losses, IR-DRO and the "
    "rankings need backward_impl='auto', 'fused' or 'matmul'"
)


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def shift_positions(shift) -> int:
    """``shift`` as the number of positions between a token and its target: ``True`` is 1,
    ``False`` 0, an integer ``k >= 0`` is ``k`` (position t is scored against t + k)."""
    if isinstance(shift, bool):
        return int(shift)
    if not isinstance(shift, numbers.Integral):
        raise TypeError(f"shift must be a bool or an int >= 0, got {type(shift).__name__} {shift!r}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0 (position t is scored against t + shift), got {shift}")
    return int(shift)


def _set(obj, name: str, value) -> None:
    """Normalise a field of a frozen dataclass in its ``__post_init__``."""
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class CrossEntropy:
    """The per-token loss: cross-entropy of ``softcap(hidden @ weight.T + bias) /
    temperature`` against the target, with PyTorch's label smoothing and class weights and
    Liger's z-loss (``docs/api.md`` writes it out).

    Attributes:
        ignore_index: target value that is not scored (any integer, as in PyTorch).
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s.
        class_weight: (V,) float weight of each class, as ``F.cross_entropy``'s
            ``weight`` (kept as fp32); must not require grad.
        lse_square_scale: z-loss coefficient ``s >= 0``: ``s * lse^2`` per scored token.
        softcap: ``None`` or ``c > 0``: logits become ``c * tanh(logits / c)`` (Gemma-2).
        temperature: ``T > 0``: the logits are divided by it after the soft-capping.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    class_weight: torch.Tensor | None = None
    lse_square_scale: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        smoothing = _finite("label_smoothing", self.label_smoothing)
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {smoothing}")
        scale = _finite("lse_square_scale", self.lse_square_scale)
        if scale < 0:
            raise ValueError(f"lse_square_scale must be >= 0, got {scale}")
        cap = self.softcap
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0
        ):
            raise ValueError(f"softcap must be None or a finite number > 0, got {cap!r}")
        temperature = _finite("temperature", self.temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the logits are divided by it), got {self.temperature}")
        weight = self.class_weight
        if weight is not None:
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"class_weight must be a torch.Tensor, got {type(weight).__name__}")
            if weight.dim() != 1:
                raise ValueError(f"class_weight must have 1 dimensions, got shape {tuple(weight.shape)}")
            if not weight.dtype.is_floating_point:
                raise TypeError(f"class_weight must be float32, bfloat16, float16 or float64, got {weight.dtype}")
            if weight.requires_grad:
                raise ValueError("class_weight must not require grad (it is a constant, as in F.cross_entropy)")
            _set(self, "class_weight", weight.float().contiguous())
        _set(self, "label_smoothing", smoothing)
        _set(self, "lse_square_scale", scale)
        _set(self, "softcap", float(cap) if cap is not None else None)
        _set(self, "temperature", temperature)

    @property
    def separate_z_loss(self) -> bool:
        """Class weights and a z-loss together: a mean divides the two parts by different
        denominators, so the z-loss is kept apart from the kernels' loss."""
        return self.class_weight is not None and bool(self.lse_square_scale)

    def terms(self):
        """The kernels' view (``op.loss_terms.LossTerms``)."""
        from .op.loss_terms import LossTerms

        return LossTerms(self.label_smoothing, self.class_weight, self.lse_square_scale)

    def check_head(self, n_vocab: int, device: torch.device | None) -> None:
        """The class weights fit a head of ``n_vocab`` classes on ``device`` (None: any)."""
        weight = self.class_weight
        if weight is None:
            return
        if weight.shape[0] != n_vocab:
            raise ValueError(
                f"class_weight has {weight.shape[0]} entries but the head has {n_vocab} classes (one weight per class)"
            )
        if device is not None and weight.device != device:
            raise ValueError(f"class_weight is on {weight.device} but weight is on {device}")


@dataclass(frozen=True)
class Returns:
    """What :func:`~hardfocus_fused.linear_cross_entropy` returns besides the loss (as an
    ``LCEOutput``); the keyword form is ``return_<field>=True``."""

    lse: bool = False
    z_loss: bool = False
    token_accuracy: bool = False
    predicted_tokens: bool = False
    entropy: bool = False

    def __post_init__(self) -> None:
        for name in ("lse", "z_loss", "token_accuracy", "predicted_tokens", "entropy"):
            _flag(f"return_{name}", getattr(self, name))

    @property
    def any(self) -> bool:
        return self.lse or self.z_loss or self.token_accuracy or self.predicted_tokens or self.entropy

    @property
    def argmax(self) -> bool:
        """The forward must track each position's argmax."""
        return self.token_accuracy or self.predicted_tokens


@dataclass(frozen=True)
class Weighting:
    """How the sequences of a batch are weighted.

    Attributes:
        method: ``"irdro"`` (``w = softmax(L / r)``), ``"midranking"`` (skip the
            ``floor(n1 B)`` largest losses, keep the next ``max(1, floor(n2 B))``),
            ``"highranking"``, ``"lowranking"``, ``"uniform"``, ``"mean"`` (the token mean
            over the batch: the standard causal-LM loss); or a weighting rule, a callable
            ``(seq_loss, n_tokens) -> weights`` (``hardfocus_fused.weighting.rules``,
            ``hardfocus_fused.weighting.accumulate``).
        r: IR-DRO temperature, > 0 (10 in the paper).
        n1, n2: the rankings' fractions, in [0, 1] (0.25 in the paper).
        seq_reduction: a sequence's loss ``L_i`` is the ``"mean"`` or ``"sum"`` of its
            tokens' losses.
        group: a ``torch.distributed`` process group: weights over the group's global
            batch (``hardfocus_loss``'s docstring); None: the local batch.
        sequence_group: a ``torch.distributed`` process group whose ranks each hold a
            part of every sequence (context or sequence parallelism: the same sequences,
            split along time, labels shifted before the split): each sequence's loss and
            token count are summed over the group before weighting; None: each rank holds
            whole sequences.
    """

    method: str | Callable = "irdro"
    r: float = 10.0
    n1: float = 0.25
    n2: float = 0.25
    seq_reduction: str = "mean"
    group: Any = None
    sequence_group: Any = None

    def __post_init__(self) -> None:
        if not callable(self.method):
            _choice("method", self.method, METHODS)
        _choice("seq_reduction", self.seq_reduction, SEQ_REDUCTIONS)
        for name in ("r", "n1", "n2"):
            _set(self, name, _finite(name, getattr(self, name)))
        if self.r <= 0:
            raise ValueError(f"r must be > 0, got {self.r}")
        for name in ("n1", "n2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def known_up_front(self) -> bool:
        """The weights depend on the sequences' sizes alone (the token mean, the uniform
        baseline, on one rank, whole sequences): every token's weight is known before the forward."""
        return (
            isinstance(self.method, str)
            and self.method in ("mean", "uniform")
            and self.group is None
            and self.sequence_group is None
        )


@dataclass(frozen=True)
class Execution:
    """How the loss runs; none of it changes the value beyond rounding.

    Attributes:
        impl: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA tensors).
        backward_impl: the Triton path's backward: ``"auto"`` (the cost model's choice for
            the device), ``"fused"``, ``"matmul"``, or ``"forward"`` (gradients formed in the
            forward, where every token's weight is known before it).
        deterministic: bitwise-reproducible gradients (no atomics); None follows
            ``torch.are_deterministic_algorithms_enabled()``.
        validate: check that every target is in ``[0, V)`` or the ignored label (one host
            synchronisation on a GPU); False skips it.
    """

    impl: str = "auto"
    backward_impl: str = "auto"
    deterministic: bool | None = None
    validate: bool = True

    def __post_init__(self) -> None:
        _choice("impl", self.impl, IMPLS)
        _choice("backward_impl", self.backward_impl, BACKWARD_IMPLS)
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be True, False or None, got {self.deterministic!r}")
        _flag("validate", self.validate)


@dataclass(frozen=True)
class HeadSharding:
    """Where the head's rows live, for a head sharded over the vocabulary (tensor
    parallelism).  A weight that is a ``DTensor`` sharded on dimension 0 (``ColwiseParallel``,
    transformers' ``tp_plan``, torchtitan) needs none of this: its mesh and offsets say it.

    Attributes:
        vocab_group: the process group over which the vocabulary is sharded, each rank
            holding a contiguous block of rows of the weight (and bias) as a plain tensor
            (Megatron's convention); None: the weight is the whole head (or a ``DTensor``).
        vocab_start: with ``vocab_group``, the vocabulary id of this rank's first row.
    """

    vocab_group: Any = None
    vocab_start: int | None = None

    def __post_init__(self) -> None:
        if (self.vocab_group is None) != (self.vocab_start is None):
            raise ValueError("vocab_group and vocab_start go together: the group and this rank's first vocabulary id")
        if self.vocab_start is not None and (
            isinstance(self.vocab_start, bool) or not isinstance(self.vocab_start, int) or self.vocab_start < 0
        ):
            raise ValueError(f"vocab_start must be an integer >= 0, got {self.vocab_start!r}")


def refuse_on_sharded_head(ce: CrossEntropy, execution: Execution) -> None:
    """One-line errors for what the fused loss does not (yet) do on a head sharded over the
    vocabulary: each would need more than the per-token log-sum-exp and target logit to
    cross the ranks."""
    refused = {
        "label_smoothing": ce.label_smoothing != 0.0,
        "class_weight": ce.class_weight is not None,
        "backward_impl='forward'": execution.backward_impl == "forward",
    }
    for name, given in refused.items():
        if given:
            raise ValueError(f"{name} is not supported on a head sharded over the vocabulary (vocab_group, DTensor)")


class _Combined:
    """Building a combined option object from keyword arguments, each routed to the part
    that owns it (``PARTS``: attribute name -> option class; ``RETURN_PREFIX`` fields of a
    ``Returns`` part are spelt ``return_<field>``)."""

    PARTS: ClassVar[dict[str, type]] = {}

    @classmethod
    def _owner(cls, name: str) -> tuple[str | None, str]:
        """``(part, field)`` of keyword ``name``; part None for a field of the object itself."""
        for part, kind in cls.PARTS.items():
            names = FIELD_NAMES[kind]
            if kind is Returns and name.startswith("return_") and name[len("return_") :] in names:
                return part, name[len("return_") :]
            if kind is not Returns and name in names:
                return part, name
        if name in FIELD_NAMES[cls] and name not in cls.PARTS:
            return None, name
        raise TypeError(f"unknown option {name!r}; the options are {', '.join(cls.keywords())}")

    @classmethod
    def keywords(cls) -> list[str]:
        """Every keyword :meth:`build` takes."""
        names = []
        for name in FIELD_NAMES[cls]:
            kind = cls.PARTS.get(name)
            if kind is None:
                names.append(name)
            else:
                prefix = "return_" if kind is Returns else ""
                names += [prefix + sub for sub in FIELD_NAMES[kind]]
        return names

    @classmethod
    def build(cls, options=None, **keywords):
        """``options`` (None: the defaults) with ``keywords`` changed, validated."""
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
        return options.replace(**keywords) if keywords else options

    def _fill_parts(self) -> None:
        """Default parts for those left None, and a clear error for a wrong kind.  (Not a
        ``default_factory``: ``torch.compile`` cannot trace one that is a class.)"""
        for part, kind in self.PARTS.items():
            value = getattr(self, part)
            if value is None:
                _set(self, part, kind())
            elif not isinstance(value, kind):
                raise TypeError(f"{part} must be a {kind.__name__}, got {type(value).__name__}")

    def replace(self, **keywords):
        """A copy with ``keywords`` changed (fields of the parts included), validated."""
        parts: dict[str | None, dict] = {}
        for name, value in keywords.items():
            part, key = self._owner(name)
            parts.setdefault(part, {})[key] = value
        own = parts.pop(None, {})
        for part, changes in parts.items():
            own[part] = dataclasses.replace(getattr(self, part), **changes)
        return dataclasses.replace(self, **own)

    def as_keywords(self) -> dict:
        """The object as the keywords :meth:`build` takes."""
        out = {}
        for name in FIELD_NAMES[type(self)]:
            value = getattr(self, name)
            kind = self.PARTS.get(name)
            if kind is None:
                out[name] = value
            else:
                prefix = "return_" if kind is Returns else ""
                out.update({prefix + sub: getattr(value, sub) for sub in FIELD_NAMES[kind]})
        return out


@dataclass(frozen=True)
class LCEOptions(_Combined):
    """Everything :func:`~hardfocus_fused.linear_cross_entropy` is asked for.

    Attributes:
        cross_entropy: the per-token loss.
        reduction: ``"mean"`` (as ``F.cross_entropy`` and the peers' fused losses),
            ``"sum"`` or ``"none"`` (the per-token loss).
        shift: ``True``/1 scores position t against ``targets[..., t + 1]`` (causal-LM
            labels), an integer ``k >= 0`` against ``t + k``; False/0 (default) against ``t``.
        returns: the extra outputs.
        execution: how it runs.
        sharding: a head sharded over the vocabulary (``HeadSharding``).
    """

    PARTS: ClassVar[dict[str, type]] = {
        "cross_entropy": CrossEntropy,
        "returns": Returns,
        "execution": Execution,
        "sharding": HeadSharding,
    }

    cross_entropy: CrossEntropy = None  # None: the defaults (filled in when built)
    reduction: str = "mean"
    shift: int = 0
    returns: Returns = None  # None: the defaults (filled in when built)
    execution: Execution = None  # None: the defaults (filled in when built)
    sharding: HeadSharding = None  # None: the defaults (filled in when built)

    def __post_init__(self) -> None:
        self._fill_parts()
        _choice("reduction", self.reduction, REDUCTIONS)
        _set(self, "shift", shift_positions(self.shift))
        if self.execution.backward_impl == "forward" and not self.known_up_front:
            raise ValueError(FORWARD_ONLY_WHEN_KNOWN)
        if self.sharding.vocab_group is not None:
            refuse_on_sharded_head(self.cross_entropy, self.execution)

    @property
    def known_up_front(self) -> bool:
        """Every token's weight in the loss is known before the forward: a mean or a sum,
        nothing else returned, and no z-loss kept apart from the class-weighted rest."""
        return self.reduction != "none" and not self.returns.any and not self.cross_entropy.separate_z_loss


@dataclass(frozen=True)
class HardFocusOptions(_Combined):
    """Everything the sample-reweighted loss (:func:`~hardfocus_fused.hardfocus_loss`) is
    asked for.

    Attributes:
        cross_entropy: the per-token loss.
        weighting: the sequence weighting.
        execution: how it runs.
        sharding: a head sharded over the vocabulary (``HeadSharding``).
        shift: ``True``/1 (default) scores position t against ``labels[:, t + 1]``,
            ``k >= 0`` against ``t + k``, False/0 against ``t``.
        return_stats: also return a ``HardFocusStats``.
    """

    PARTS: ClassVar[dict[str, type]] = {
        "cross_entropy": CrossEntropy,
        "weighting": Weighting,
        "execution": Execution,
        "sharding": HeadSharding,
    }

    cross_entropy: CrossEntropy = None  # None: the defaults (filled in when built)
    weighting: Weighting = None  # None: the defaults (filled in when built)
    execution: Execution = None  # None: the defaults (filled in when built)
    sharding: HeadSharding = None  # None: the defaults (filled in when built)
    shift: int = 1
    return_stats: bool = False

    def __post_init__(self) -> None:
        self._fill_parts()
        _set(self, "shift", shift_positions(self.shift))
        _flag("return_stats", self.return_stats)
        if self.execution.backward_impl == "forward" and not self.known_up_front:
            raise ValueError(FORWARD_ONLY_WHEN_KNOWN)
        if self.sharding.vocab_group is not None:
            refuse_on_sharded_head(self.cross_entropy, self.execution)

    @property
    def known_up_front(self) -> bool:
        """Every token's weight is known before the forward (see ``Weighting``), and no
        z-loss is kept apart from the class-weighted cross-entropy."""
        return self.weighting.known_up_front and not self.cross_entropy.separate_z_loss


# Each option class's field names, read where torch.compile may be tracing (it cannot
# call dataclasses.fields on a class).
FIELD_NAMES: dict[type, tuple[str, ...]] = {
    kind: tuple(item.name for item in dataclasses.fields(kind))
    for kind in (CrossEntropy, Returns, Weighting, Execution, HeadSharding, LCEOptions, HardFocusOptions)
}
