"""Patch-time probe: measure how a model turns ``lm_head`` outputs into logits, and check
that the patched loss equals the model's own.

Three kinds of forward on ``_PROBE_TOKENS`` random tokens, in eval mode and without grad
(except the training path of step 3):

1. logits driven small (``|lm_head(h)| <= 0.01``, where soft-capping is linear): fit the
   constant ``scale`` in ``logits = scale * lm_head(h)``, then snap it to 1 or to a logit
   scaling the config declares (``logit_scale``, ``logits_scaling`` or their reciprocals);
2. logits driven large (three times the soft-cap, or 30): the model's logits must equal
   ``softcap(scale * lm_head(h))`` with the config's ``final_logit_softcapping``;
3. with ``labels``: the patched loss (``method="mean"``), on the training path (with grad)
   and the evaluation path, must equal the model's own loss.

The probe scales the hidden states inside the patched ``lm_head`` (``probe_gain``), so it
reaches both ranges on any model without touching its weights.
"""

from __future__ import annotations

import math

import torch

_PROBE_TOKENS = 8
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # others (bf16, fp16): 3e-2


def _logits_with_gain(patch, runner, ids, gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(model logits, raw lm_head output) in fp64 for hidden states scaled by ``gain``."""
    patch.probe_gain = gain
    logits = runner(input_ids=ids).logits
    return logits.double(), patch.probe_raw.double()


def _declared_scales(config) -> list[float]:
    scales = [1.0]
    for cfg in (config, getattr(config, "text_config", None)):
        for name, value in vars(cfg).items() if cfg is not None else ():
            if "logit" in name and "scal" in name and isinstance(value, (int, float)) and value:
                scales += [float(value), 1.0 / float(value)]
    return scales


def _fit_scale(patch, runner, ids, head_max: float, exact_dtype: bool) -> float:
    y, z = _logits_with_gain(patch, runner, ids, 1e-2 / head_max)
    fitted = ((y * z).sum() / (z * z).sum()).item()
    name = type(patch.model).__name__
    if not math.isfinite(fitted) or fitted == 0:
        raise ProbeRefusal(f"cannot patch {name}: its logits do not follow lm_head's output")
    # The nearest declared scale, if it is within the fit's precision (2%, for bf16 models).
    declared = min(_declared_scales(getattr(patch.model, "config", None)), key=lambda s: abs(fitted / s - 1))
    if abs(fitted / declared - 1) < 2e-2:
        return declared
    if exact_dtype:
        return fitted
    raise ProbeRefusal(
        f"cannot patch {name}: its logits are lm_head's output times {fitted:.4g}, a scaling its "
        f"config does not declare"
    )


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


class ProbeRefusal(ValueError):
    """The probe measured logits or a loss the patch does not reproduce."""


def probe(patch, runner) -> None:
    """Set ``patch.scale``; raise ``ValueError`` when the model's logits or loss differ.

    ``runner`` is the module the user patched (the model, or a PEFT, DDP or FSDP wrapper
    around it): the probe's forwards go through it, so wrappers gather sharded weights.
    Any error inside the probe's forwards (a model that reshapes the logits, computes its
    loss without ``loss_function``, or runs ``lm_head`` in chunks) becomes a ``ValueError``
    saying the architecture is not supported."""
    was_training = runner.training
    runner.eval()
    try:
        with torch.no_grad():
            _measure(patch, runner)
    except ProbeRefusal:
        raise
    except Exception as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ValueError(
            f"cannot patch {type(patch.model).__name__}: this architecture is not supported (the "
            f"patch-time probe failed with {type(error).__name__}: {first_line:.200}); apply_hardfocus "
            f"needs a causal LM whose forward computes the logits as lm_head(hidden), elementwise "
            f"post-processing aside, and its loss through self.loss_function"
        ) from error
    finally:
        runner.train(was_training)
        patch.mode, patch.probe_gain = "loss", 1.0
        patch.probe_raw = None
        patch.pop_log_values()
        patch.pop_eval_log_values()


def _measure(patch, runner) -> None:
    model, head = patch.model, patch.head
    name = type(model).__name__
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.out_features, (1, _PROBE_TOKENS), generator=gen)
    ids = ids.to(next(runner.parameters()).device)
    patch.mode = "probe"
    _logits_with_gain(patch, runner, ids, 1.0)
    # lm_head's own output, not hidden @ weight: under FSDP the weight is whole only there.
    raw = patch.probe_raw
    tolerance = _TOLERANCE.get(raw.dtype, 3e-2)
    head_max = raw.double().abs().max().item()
    if not head_max > 0:
        raise ProbeRefusal(f"cannot patch {name}: lm_head's output is zero or not finite on the probe")
    patch.scale = _fit_scale(patch, runner, ids, head_max, exact_dtype=raw.dtype in _TOLERANCE)

    reach = 3 * patch.softcap if patch.softcap else 30.0
    y, z = _logits_with_gain(patch, runner, ids, reach / abs(patch.scale) / head_max)
    expected = patch.scale * z
    if patch.softcap:
        expected = patch.softcap * torch.tanh(expected / patch.softcap)
    err = _relative_error(y, expected)
    if err > tolerance:
        raise ProbeRefusal(
            f"cannot patch {name}: its logits are not softcap(scale * lm_head(h)) "
            f"(relative difference {err:.2e} with softcap={patch.softcap}, "
            f"scale={patch.scale}); its forward transforms the logits in a way "
            f"hardfocus does not reproduce"
        )

    patch.mode = "off"
    reference = runner(input_ids=ids, labels=ids).loss
    patch.mode = "loss"
    if not torch.isfinite(reference).all():
        raise ProbeRefusal(
            f"cannot patch {name}: its own loss on the probe's random tokens is not finite, so the "
            f"patched loss cannot be checked against it"
        )
    # The model's own loss is plain cross-entropy: compared with the plain fused loss.
    with patch.options_for(
        method="mean", seq_reduction="mean", group=None, label_smoothing=0.0, class_weight=None, lse_square_scale=0.0
    ):
        # The training path (with grad: the stand-in logits) and the evaluation path.
        with torch.enable_grad():
            ours = runner(input_ids=ids, labels=ids).loss.detach()
        evaluated = runner(input_ids=ids, labels=ids).loss
    for what, loss in (("patched", ours), ("patched evaluation", evaluated)):
        if not torch.isfinite(loss).all():
            # The model computed more of its loss from the logits than loss_function: from
            # the patch's empty stand-in such a term is not finite.
            raise ProbeRefusal(
                f"cannot patch {name}: its forward adds a term computed from the logits to the loss beyond "
                f"self.loss_function (the {what} forward gave no finite loss without the logits); hardfocus "
                f"cannot reproduce it: turn that term off in the model, or train {name} without the patch"
            )
        err = _relative_error(loss.double().reshape(1), reference.double().reshape(1))
        if err > tolerance:
            raise ProbeRefusal(
                f"cannot patch {name}: the {what} loss {loss.item():.6g} differs from the "
                f"model's own {reference.item():.6g}"
            )
