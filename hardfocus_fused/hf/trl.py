"""TRL: ``HardFocusSFTTrainer``, an ``SFTTrainer`` that trains on a patched model's loss.

TRL's ``SFTTrainer`` (1.x) computes its training loss itself, from per-token
log-probabilities of its own fused LM head, so a model patched with
:func:`~hardfocus_fused.apply_hardfocus` would train unweighted; the patch refuses that
with a ``ValueError``.  This subclass keeps everything else of ``SFTTrainer`` (dataset
preparation, packing, chat templates, PEFT, callbacks) and takes the loss from the
model, as the ``transformers.Trainer`` does: the sample-reweighted loss, with the
Trainer's gradient accumulation and multi-process scaling handled by the patch.  A
``sample_weight`` column of the dataset (one number per example) reaches the loss (not
with ``packing``, whose rows mix examples).  Its
logs have the loss but not TRL's ``entropy`` and ``mean_token_accuracy``, which come from
TRL's own head.
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from .patch import DATA_COLUMNS, hardfocus_patch
from .trainer import WeightColumns, take_label_smoothing


class HardFocusSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose loss is the patched model's (see the module docstring).

    The model must be patched with ``apply_hardfocus`` before (or right after) the trainer
    is built; a model that is not patched is refused.  ``label_smoothing_factor`` is moved
    into the fused loss (``hf.trainer.take_label_smoothing``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        take_label_smoothing(self)
        # The datasets' weight columns (apply_hardfocus's token_weight / sample_weight) are
        # kept and carried through TRL's collator, which pads on the right.
        self.data_collator = WeightColumns(self.data_collator, padding_side="right")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *DATA_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        take_label_smoothing(self)   # when the model was patched after the trainer was built
        if hardfocus_patch(self.model) is None:
            raise ValueError("HardFocusSFTTrainer trains a model patched with hardfocus_fused.apply_hardfocus; "
                             "patch the model first, or use trl.SFTTrainer")
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return Trainer.prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
