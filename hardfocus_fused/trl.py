"""TRL: ``HardFocusSFTTrainer``, an ``SFTTrainer`` that trains on a patched model's loss.

TRL's ``SFTTrainer`` (1.x) computes its training loss itself, from per-token
log-probabilities of its own fused LM head, so a model patched with
:func:`~hardfocus_fused.apply_hardfocus` would train unweighted; the patch refuses that
with a ``ValueError``.  This subclass keeps everything else of ``SFTTrainer`` (dataset
preparation, packing, chat templates, PEFT, callbacks) and takes the loss from the
model, as the ``transformers.Trainer`` does: the sample-reweighted loss, with the
Trainer's gradient accumulation and multi-process scaling handled by the patch.  Its
logs have the loss but not TRL's ``entropy`` and ``mean_token_accuracy``, which come from
TRL's own head.
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from .hf import hardfocus_patch


class HardFocusSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the patched model's (see the module docstring).

    The model must be patched with ``apply_hardfocus`` before (or right after) the trainer
    is built; a model that is not patched is refused.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if hardfocus_patch(self.model) is None:
            raise ValueError("HardFocusSFTTrainer trains a model patched with hardfocus_fused.apply_hardfocus; "
                             "patch the model first, or use trl.SFTTrainer")
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return Trainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
