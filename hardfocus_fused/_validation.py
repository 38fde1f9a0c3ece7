"""Checks at the Python boundary: bad input raises ``ValueError``/``TypeError`` naming the
argument, before any kernel runs."""

from __future__ import annotations

import math
import numbers

import torch

from .weighting import METHODS, SEQ_REDUCTIONS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IMPLS = ("auto", "triton", "torch")
BACKWARD_IMPLS = ("auto", "fused", "matmul", "forward")
REDUCTIONS = ("none", "sum", "mean")


def check_tensor(name: str, value, ndim: int | tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if value.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(value.shape)}")


def check_float(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``hidden`` (..., H) against ``weight`` (V, H) and ``bias`` (V,): dtypes, sizes, devices."""
    check_float("hidden", hidden)
    check_tensor("weight", weight, 2)
    check_float("weight", weight)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[-1]} "
                         f"(weight must be (V, H), hidden (..., H))")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V >= 1)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_float("bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_labels(name: str, labels, expected_shape: tuple[int, ...], n_vocab: int, ignore_index: int,
                 device: torch.device, check_values: bool = True) -> None:
    """Integer labels of the expected shape whose values are in ``[0, V)`` or ``ignore_index``.

    The value check reads one flag back from the device (a host synchronisation on GPU);
    ``check_values=False`` skips it.  Under ``torch.compile`` the fused op makes it instead
    (``deferred_label_check``), on the targets it is given.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {tuple(expected_shape)} to match hidden, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but hidden is on {device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if check_values and labels.numel() and not torch.compiler.is_compiling():
        check_label_values(name, labels, n_vocab, ignore_index)


def check_label_values(name: str, labels: torch.Tensor, n_vocab: int, ignore_index: int) -> None:
    """Every value of ``labels`` is in ``[0, V)`` or ``ignore_index`` (one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"{name} contains {first}, outside [0, {n_vocab}) and not ignore_index={ignore_index}")


def deferred_label_check(name: str, check_values: bool) -> str:
    """The name the fused op checks the values of its targets under (``fused_op``), when
    ``check_labels`` left that check to it: under ``torch.compile``, where a host
    synchronisation outside the op would break the graph; else ``""``."""
    return name if check_values and torch.compiler.is_compiling() else ""


def check_shift(shift) -> int:
    """``shift`` as the number of positions between a token and its target: ``True`` is 1,
    ``False`` 0, an integer ``k >= 0`` is ``k`` (position t is scored against t + k)."""
    if isinstance(shift, bool):
        return int(shift)
    if not isinstance(shift, numbers.Integral):
        raise TypeError(f"shift must be a bool or an int >= 0, got {type(shift).__name__} {shift!r}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0 (position t is scored against t + shift), got {shift}")
    return int(shift)


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_loss_terms(label_smoothing, class_weight, lse_square_scale, n_vocab: int, device: torch.device | None):
    """The cross-entropy variant's options as a ``ce_terms.LossTerms`` (class weights as
    fp32; on ``device`` unless it is None)."""
    from .ce_terms import LossTerms

    label_smoothing = _finite_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    lse_square_scale = _finite_number("lse_square_scale", lse_square_scale)
    if lse_square_scale < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {lse_square_scale}")
    if class_weight is not None:
        check_tensor("class_weight", class_weight, 1)
        check_float("class_weight", class_weight)
        if class_weight.shape[0] != n_vocab:
            raise ValueError(f"class_weight has {class_weight.shape[0]} entries but the head has {n_vocab} classes "
                             f"(one weight per class)")
        if device is not None and class_weight.device != device:
            raise ValueError(f"class_weight is on {class_weight.device} but weight is on {device}")
        if class_weight.requires_grad:
            raise ValueError("class_weight must not require grad (it is a constant, as in F.cross_entropy)")
        class_weight = class_weight.float().contiguous()
    return LossTerms(label_smoothing, class_weight, lse_square_scale)


def check_data_weight(name: str, value, shape: tuple[int, ...], device: torch.device,
                      check_values: bool) -> torch.Tensor:
    """Non-negative finite float weights of ``shape`` on ``device``; returns the tensor to use.

    The value check reads one flag back from the device; ``check_values=False`` skips it.
    Under ``torch.compile`` it runs inside an op the compiler does not trace into
    (``hardfocus_fused::checked_weight``), whose output (a copy) is what is used."""
    check_tensor(name, value, len(shape))
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")
    if not check_values or not value.numel():
        return value
    if torch.compiler.is_compiling():
        return checked_weight(value, name)
    _check_weight_values(value, name)
    return value


def _check_weight_values(value: torch.Tensor, name: str) -> None:
    if not bool((torch.isfinite(value) & (value >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0")


@torch.library.custom_op("hardfocus_fused::checked_weight", mutates_args=())
def checked_weight(value: torch.Tensor, name: str) -> torch.Tensor:
    """A copy of ``value`` once its values are checked (see ``check_data_weight``)."""
    _check_weight_values(value, name)
    return value.clone()


@checked_weight.register_fake
def _(value, name):
    return torch.empty_like(value)


def check_temperature(temperature) -> float:
    """A finite ``temperature > 0`` as a float."""
    value = _finite_number("temperature", temperature)
    if value <= 0:
        raise ValueError(f"temperature must be > 0 (the logits are divided by it), got {temperature}")
    return value


def check_softcap(softcap) -> None:
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def check_weighting(method, r: float, n1: float, n2: float, seq_reduction: str) -> None:
    """``method`` is a name in ``METHODS`` or a weighting rule ``(seq_loss, n_tokens) -> weights``."""
    if not callable(method):
        check_choice("method", method, METHODS)
    check_choice("seq_reduction", seq_reduction, SEQ_REDUCTIONS)
    for name, value in (("r", r), ("n1", n1), ("n2", n2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if r <= 0:
        raise ValueError(f"r must be > 0, got {r}")
    for name, value in (("n1", n1), ("n2", n2)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_position_ids(name: str, value, labels: torch.Tensor) -> None:
    """Integer (or, for a mask, bool) ``value`` shaped and placed like ``labels``."""
    check_tensor(name, value, 2)
    if value.dtype.is_floating_point or value.dtype.is_complex or (value.dtype == torch.bool and name == "position_ids"):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.shape != labels.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but labels has {tuple(labels.shape)}")
    if value.device != labels.device:
        raise ValueError(f"{name} is on {value.device} but labels is on {labels.device}")
