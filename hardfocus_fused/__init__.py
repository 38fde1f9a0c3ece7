"""hardfocus-fused: IR-DRO / MidRanking sample-reweighted LM loss on fused Triton kernels.

The package has three parts:

- the loss core: what a loss is (``options``), the sample-reweighted loss (``loss``) and
  the fused ``lm_head`` + cross-entropy (``cross_entropy``) on the fused operator
  (``op``: its registration with ``torch.library``, its torch and Triton paths, the loss
  terms it computes), the weighting (``weighting``: the paper's methods, plug-in rules,
  micro-batch accumulation, weights over ranks), the RL losses (``rl``), the token
  bookkeeping (``tokens``) and the input checks (``input_checks``); the Triton kernels,
  their configurations and their cost model (``hardfocus_fused.kernels``);
- ``hardfocus_fused.hf``: the Hugging Face integration (``apply_hardfocus``, Trainer and TRL);
- ``hardfocus_fused.experiment``: the paper's experiment and the command lines.

``import hardfocus_fused`` loads the core only: the integration's names below are imported
when first used, and neither the core nor the integration needs transformers to import.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _register_kernels_folder() -> None:
    """Make the repository's top-level ``kernels/`` folder importable as
    ``hardfocus_fused.kernels`` when the package runs from a checkout.

    A wheel holds the kernels inside the package (``pyproject.toml`` maps the folder there), so
    nothing is done.  In a plain checkout on ``sys.path`` and in an editable install (whose
    setuptools finder cannot map a folder without ``__init__.py`` into a regular package)
    the folder sits beside this package: it is registered as the namespace subpackage
    ``hardfocus_fused.kernels``.  ``kernels/`` has no ``__init__.py`` on purpose: from the
    repository root a directory without one never hides an installed regular package of
    the same name, and the name ``kernels`` belongs to Hugging Face's package, which
    transformers imports (README, "Layout").
    """
    name = f"{__name__}.kernels"
    if name in sys.modules or (Path(__file__).parent / "kernels").is_dir():
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "forward.py").is_file():
        return  # neither layout: ``import hardfocus_fused.kernels`` names the missing module
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    globals()["kernels"] = module  # what importing a submodule does to its parent


_register_kernels_folder()

from .cross_entropy import LCEOutput, linear_cross_entropy  # noqa: E402
from .loss import HardFocusLoss, HardFocusStats, hardfocus_loss  # noqa: E402
from .weighting.methods import METHODS, sequence_weights  # noqa: E402

__all__ = [
    "hardfocus_loss",
    "HardFocusLoss",
    "HardFocusStats",
    "linear_cross_entropy",
    "LCEOutput",
    "sequence_weights",
    "METHODS",
    "apply_hardfocus",
    "remove_hardfocus",
    "hardfocus_patch",
    "HardFocusCallback",
]

# Names of the Hugging Face integration exported here, and the module that defines each.
_INTEGRATION = {
    "apply_hardfocus": "hf",
    "remove_hardfocus": "hf",
    "hardfocus_patch": "hf",
    "HardFocusCallback": "hf.trainer",  # needs transformers
}


def __getattr__(name: str):
    module = _INTEGRATION.get(name)
    if module is None:
        raise AttributeError(f"module 'hardfocus_fused' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
