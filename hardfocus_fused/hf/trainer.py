"""``HardFocusCallback``: the weighting's statistics in the ``transformers.Trainer`` logs."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from .patch import hardfocus_patch


class HardFocusCallback(TrainerCallback):
    """Adds ``hardfocus/*`` statistics (max weight, effective sample size ``1/sum w^2``,
    mean / max / weighted sequence loss), averaged over the loss calls since the previous
    log, to every training log of a model patched with :func:`apply_hardfocus`; and to
    every evaluation log the same statistics of the evaluation batches under the eval
    prefix (``eval_hardfocus/weighted_loss``, ...), beside the plain token-mean
    ``eval_loss``.

    ``HardFocusCallback.attach(trainer)`` puts it first among the trainer's callbacks, so
    the console, ``log_history`` and every reporting integration see the values; added with
    ``Trainer(callbacks=[...])`` it runs after the built-in ones, and the values reach
    ``trainer.state.log_history`` and the callbacks after it.
    """

    @classmethod
    def attach(cls, trainer: Trainer) -> HardFocusCallback:
        """Add the callback first among ``trainer``'s callbacks, and move the Trainer's
        label smoothing (``label_smoothing_factor``) into the fused loss: the Trainer would
        otherwise call the model without labels and smooth full logits itself."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        take_label_smoothing(trainer)
        return callback

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        patch = hardfocus_patch(model) if model is not None else None
        if patch is None or logs is None:
            return
        if "loss" in logs:  # a training log
            values = patch.pop_log_values()
        else:
            prefix = next((key[: -len("_runtime")] for key in logs if key.endswith("_runtime")), None)
            if prefix is None:  # neither training nor evaluation
                return
            values = {f"{prefix}_{key}": value for key, value in patch.pop_eval_log_values().items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def take_label_smoothing(trainer: Trainer) -> None:
    """Move ``trainer``'s label smoothing into the patch of its model (the same semantics:
    PyTorch's ``label_smoothing``), so the Trainer passes the labels to the model."""
    patch = hardfocus_patch(trainer.model)
    smoother = getattr(trainer, "label_smoother", None)
    if patch is None or smoother is None:
        return
    patch.options = patch.options.replace(label_smoothing=float(smoother.epsilon))
    trainer.label_smoother = None


class WeightColumns:
    """A data collator that carries the weight columns ``apply_hardfocus`` reads from a
    batch: ``sample_weight`` (one number per example) and ``token_weight`` (one per token,
    aligned with ``input_ids``/``labels``), around any ``collator`` that pads the rest.

    ``token_weight`` is padded with 0 on ``padding_side`` (the tokenizer's, usually) to the
    batch's sequence length; both come back as float tensors.
    """

    def __init__(self, collator, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.collator, self.padding_side = collator, padding_side

    def __call__(self, features: list[dict]) -> dict:
        import torch

        features = [dict(f) for f in features]
        token_weight = [f.pop("token_weight", None) for f in features]
        sample_weight = [f.pop("sample_weight", None) for f in features]
        batch = self.collator(features)
        if all(w is not None for w in sample_weight):
            batch["sample_weight"] = torch.as_tensor([float(w) for w in sample_weight], dtype=torch.float32)
        if all(w is not None for w in token_weight):
            length = batch["input_ids"].shape[1]
            rows = []
            for w in token_weight:
                w = torch.as_tensor(w, dtype=torch.float32).flatten()
                if w.numel() > length:
                    raise ValueError(f"a token_weight of {w.numel()} entries for a batch of {length} positions")
                pad = torch.zeros(length - w.numel())
                rows.append(torch.cat([w, pad] if self.padding_side == "right" else [pad, w]))
            batch["token_weight"] = torch.stack(rows)
        return batch


class AccumulationCallback(TrainerCallback):
    """Calls ``rule.reset()`` at the start of every optimizer step, for the global-batch
    weighting rules of ``hardfocus_fused.weighting.accumulate`` (``AccumulatedIRDRO``), and tells
    the patched model by what factor the Trainer multiplies the loss (the world size when
    it averages tokens across devices), which such a rule's loss must not get."""

    def __init__(self, rule) -> None:
        self.rule = rule

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        patch = hardfocus_patch(model) if model is not None else None
        if patch is not None:
            multiplies = args.average_tokens_across_devices and args.world_size > 1
            patch.trainer_loss_scale = args.world_size if multiplies else 1

    def on_step_begin(self, args, state, control, **kwargs):
        self.rule.reset()
