"""pytest-benchmark microbenchmarks: forward, backward and forward+backward per ``impl``.

``python -m pytest benchmarks/test_micro.py`` (not part of the test suite's run).  Small
shapes on the CPU (``impl="torch"``, and the Triton kernels under the interpreter are too
slow to time); the head shapes on a GPU (``impl="triton"`` and ``"torch"``).
"""

import pytest
import torch

from benchmarks.shapes import HEADS, SHAPES, make_inputs
from hardfocus_fused import hardfocus_loss

CUDA = torch.cuda.is_available()
IMPLS = ["triton", "torch"] if CUDA else ["torch"]
CASES = list(HEADS) if CUDA else ["tiny", "cpu"]


@pytest.fixture(params=CASES)
def inputs(request):
    dtype = torch.bfloat16 if CUDA else torch.float32
    return make_inputs(SHAPES[request.param], "trained-like", dtype, "cuda" if CUDA else "cpu")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["fwd", "bwd", "fwd+bwd"])
def test_weighted_loss(benchmark, inputs, impl, kind):
    hidden, weight, labels = inputs

    def loss_of():
        return hardfocus_loss(hidden, weight, labels, method="irdro", impl=impl)

    def setup():
        hidden.grad = weight.grad = None
        return ((loss_of(),) if kind == "bwd" else ()), {}

    def step(*loss):
        if kind == "bwd":
            loss[0].backward()
        else:
            out = loss_of()
            if kind == "fwd+bwd":
                out.backward()
        _sync()

    benchmark.pedantic(step, setup=setup, rounds=5 if not CUDA else 20, warmup_rounds=1)
