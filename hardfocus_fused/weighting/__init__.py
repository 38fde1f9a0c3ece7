"""How the sequences of a batch are weighted.

- ``methods``: the paper's methods (IR-DRO, the rankings, uniform, the token mean) as
  ``sequence_weights``, and sample weights from the data;
- ``rules``: plug-in weighting rules (``Rule``, Rho-1's ``ExcessLoss``, ``DFT``);
- ``accumulate``: weights over every micro-batch of an optimizer step;
- ``global_batch``: weights over the global batch of a data-parallel group.
"""

from .methods import METHODS, SEQ_REDUCTIONS, sequence_weights, with_sample_weights

__all__ = ["METHODS", "SEQ_REDUCTIONS", "sequence_weights", "with_sample_weights"]
