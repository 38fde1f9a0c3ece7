"""Checks of the inputs at the Python boundary (tensors, their shapes, devices and values):
bad input raises ``ValueError``/``TypeError`` naming the argument, before any kernel runs.
The options are checked when their objects are built (``hardfocus_fused.options``)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, value, ndim: int | tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if value.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(value.shape)}")


def check_float(name: str, value: torch.Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``hidden`` (..., H) against ``weight`` (V, H) and ``bias`` (V,): dtypes, sizes, devices."""
    check_float("hidden", hidden)
    check_tensor("weight", weight, 2)
    check_float("weight", weight)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has hidden size {weight.shape[1]} but hidden has {hidden.shape[-1]} "
            f"(weight must be (V, H), hidden (..., H))"
        )
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


def check_labels(
    name: str,
    labels,
    expected_shape: tuple[int, ...],
    n_vocab: int,
    ignore_index: int,
    device: torch.device,
    check_values: bool = True,
) -> None:
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
    if check_values and labels.numel() and not torch.compiler.is_compiling():
        check_label_values(name, labels, n_vocab, ignore_index)


def check_label_values(name: str, labels: torch.Tensor, n_vocab: int, ignore_index: int) -> None:
    """Every value of ``labels`` is in ``[0, V)`` or ``ignore_index`` (one host sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"{name} contains {first}, outside [0, {n_vocab}) and not ignore_index={ignore_index}")


def deferred_label_check(name: str, check_values: bool) -> str:
    """The name the fused op checks the values of its targets under (``op.registration``), when
    ``check_labels`` left that check to it: under ``torch.compile``, where a host
    synchronisation outside the op would break the graph; else ``""``."""
    return name if check_values and torch.compiler.is_compiling() else ""


def check_data_weight(
    name: str, value, shape: tuple[int, ...], device: torch.device, check_values: bool
) -> torch.Tensor:
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


def check_position_ids(name: str, value, labels: torch.Tensor) -> None:
    """Integer (or, for a mask, bool) ``value`` shaped and placed like ``labels``."""
    check_tensor(name, value, 2)
    if (
        value.dtype.is_floating_point
        or value.dtype.is_complex
        or (value.dtype == torch.bool and name == "position_ids")
    ):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.shape != labels.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but labels has {tuple(labels.shape)}")
    if value.device != labels.device:
        raise ValueError(f"{name} is on {value.device} but labels is on {labels.device}")
