"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported; the package imports
triton lazily, so setting it here (conftest runs first) is enough and changes nothing for
the torch-path tests.  With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # ``@triton.jit`` reads TRITON_INTERPRET when a kernel module is imported: import them
    # now, so that a test changing the variable (to check the error without the
    # interpreter) cannot leave compiled-mode kernels to the tests after it.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        import hardfocus_fused.kernels.backward_deterministic  # noqa: F401
        import hardfocus_fused.kernels.backward_fused  # noqa: F401
        import hardfocus_fused.kernels.backward_matmul  # noqa: F401
        import hardfocus_fused.kernels.forward  # noqa: F401


# What the suite ran on, printed in pytest's header (CI installs the newest releases, and
# the oldest declared versions, into new environments: this says which it resolved).
_VERSIONS_OF = (
    "torch",
    "triton",
    "numpy",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "kernels",
    "liger-kernel",
    "lm-eval",
    "deepspeed",
)


def pytest_report_header(config) -> str:
    import importlib.metadata
    import platform

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return "versions: " + ", ".join(
        [f"python {platform.python_version()}"] + [f"{name} {version(name)}" for name in _VERSIONS_OF]
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (compiled Triton kernels); skipped on CPU")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device() -> str:
    """Device whose tensors the Triton path runs on: CUDA, else the CPU interpreter."""
    return "cuda" if HAS_CUDA else "cpu"
