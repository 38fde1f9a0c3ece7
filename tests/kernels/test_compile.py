"""The kernels compile for every GPU architecture they run on, as they are launched,
checked without a GPU.

Triton's interpreter accepts kernels that the GPU compiler rejects, and a kernel compiled
without the JIT's launch-time specialisation is a different kernel (other pipelining,
other shared memory).  ``benchmarks.kernel_resources`` compiles every launch of the
package's launchers on the benchmark heads (bf16, fp16, fp32) for sm_90 exactly as the
JIT would, with Triton's bundled ptxas; this test holds what it reports, and for the other
architectures (``kernels.config.ARCHITECTURES``) the same on the Llama-3-8B head in bf16
and fp32, each with that architecture's default configurations.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


def kernel_resources(*args: str) -> str:
    """``python -m benchmarks.kernel_resources ARGS``'s output, run without the interpreter
    (which the suite turns on, and which would give the interpreter's configs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_resources", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources")
    kernel_resources("--out", str(out))
    (result,) = out.glob("kernel-resources-sm90-*.json")
    return json.loads(result.read_text())["variants"]


pytestmark = pytest.mark.skipif(not nvidia_backend_available(), reason="triton's NVIDIA backend is not installed")


def test_every_launched_variant_compiles(variants):
    kernels = {v["kernel"] for v in variants}
    assert kernels == {"forward", "backward", "grad_hidden (det.)", "grad_weight (det.)", "dlogits (matmul)"}
    assert {v["dtype"] for v in variants} == {"bf16", "fp16", "fp32"}


def test_no_register_spills(variants):
    spilling = [v for v in variants if v["stack"] or v["local"]]
    assert not spilling, spilling


def test_shared_memory_fits_a_hopper_sm(variants):
    assert max(v["shared"] for v in variants) <= 232448  # 227 KiB


def test_atomic_backward_has_no_memory_barriers(variants):
    """Relaxed atomics: plain reductions (RED), not barrier-wrapped acquire-release atomics."""
    atomic = [v for v in variants if v["kernel"] == "backward"]
    assert atomic and all(v["membar"] == 0 and v["atom"] == 0 and v["red"] > 0 for v in atomic), atomic


def test_pipelining_is_what_the_config_asks(variants):
    """Compiled with the launch-time specialisation, the half-precision forward is the
    3-stage pipelined kernel (the unspecialised compile came out with 1 stage, 24 KB)."""
    half_forward = [v for v in variants if v["kernel"] == "forward" and v["dtype"] == "bf16" and not _reads_logits(v)]
    assert half_forward and all(v["num_stages"] == 3 and v["shared"] >= 64 * 1024 for v in half_forward)


def _reads_logits(variant) -> bool:
    """The three-product path's forward, which reads stored logits: no matmul in it."""
    return "STORED_LOGITS" in variant["flags"]


def _matmul_kernels(variants, dtypes=("bf16",)):
    return [v for v in variants if v["dtype"] in dtypes and v["kernel"] != "dlogits (matmul)" and not _reads_logits(v)]


def test_stored_logits_forward_is_compiled(variants):
    stored = [v for v in variants if _reads_logits(v)]
    assert {v["dtype"] for v in stored} == {"bf16", "fp16", "fp32"} and all(v["mma"] == "-" for v in stored)


def test_sweep_candidates_compile_without_spills():
    """``benchmarks.sweep`` spends GPU time only on candidates that could be the default."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import sweep

    rows = [json.loads(line) for line in kernel_resources("--sweep-candidates").splitlines() if line.startswith("{")]
    assert len(rows) == len(sweep.FORWARD) + len(sweep.BACKWARD)
    assert not [r for r in rows if r["stack"] or r["local"]], rows
    assert max(r["shared"] for r in rows) <= 232448


OTHER_ARCHITECTURES = ["sm_80", "sm_86", "sm_89", "sm_100a", "sm_120"]


@pytest.fixture(scope="module", params=OTHER_ARCHITECTURES)
def arch_variants(request, tmp_path_factory):
    from hardfocus_fused.kernels.config import ARCHITECTURES

    out = tmp_path_factory.mktemp(request.param)
    kernel_resources("--arch", request.param, "--heads", "llama3-8b", "--dtypes", "bf16,fp32", "--out", str(out))
    (result,) = out.glob("kernel-resources-sm*.json")
    arch = next(a for a in ARCHITECTURES.values() if a.name == request.param)
    return request.param, arch.shared_bytes, json.loads(result.read_text())["variants"]


def test_every_architecture_compiles_clean(arch_variants):
    """No spills, shared memory within what a block may have there (99 KiB on sm_86/89/120,
    where Hopper's 128 KiB backward would not launch), and tensor-core MMA in every
    half-precision matmul kernel: HGMMA only on sm_90a (wgmma), HMMA (mma.sync) before it
    and on sm_120, UTCHMMA (tcgen05) on sm_100a."""
    name, shared_bytes, variants = arch_variants
    assert {v["kernel"] for v in variants} >= {"forward", "backward", "grad_hidden (det.)", "grad_weight (det.)"}
    assert not [v for v in variants if v["stack"] or v["local"]], name
    assert max(v["shared"] for v in variants) <= shared_bytes, name
    expected = "UTCHMMA" if name == "sm_100a" else "HMMA"
    matmuls = _matmul_kernels(variants)
    assert matmuls and all(v["mma"] == expected for v in matmuls), [(v["kernel"], v["mma"]) for v in matmuls]
    assert any(_reads_logits(v) for v in variants), name


def test_hopper_uses_wgmma(variants):
    matmuls = _matmul_kernels(variants, ("bf16", "fp16"))
    assert matmuls and all(v["mma"] == "HGMMA" for v in matmuls)
