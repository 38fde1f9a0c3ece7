"""``HardFocusCallback``: the weighting's statistics in the ``transformers.Trainer`` logs."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from .hf import hardfocus_patch


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
    def attach(cls, trainer: Trainer) -> "HardFocusCallback":
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        patch = hardfocus_patch(model) if model is not None else None
        if patch is None or logs is None:
            return
        if "loss" in logs:                                   # a training log
            values = patch.pop_log_values()
        else:
            prefix = next((key[: -len("_runtime")] for key in logs if key.endswith("_runtime")), None)
            if prefix is None:                               # neither training nor evaluation
                return
            values = {f"{prefix}_{key}": value for key, value in patch.pop_eval_log_values().items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


class AccumulationCallback(TrainerCallback):
    """Calls ``rule.reset()`` at the start of every optimizer step, for the global-batch
    weighting rules of ``hardfocus_fused.accumulate`` (``AccumulatedIRDRO``), and tells
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
