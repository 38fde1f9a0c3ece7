"""The benchmark harness runs end to end on the CPU and writes the documented schema."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import compare, peers  # noqa: E402
from benchmarks.shapes import SHAPES, make_inputs  # noqa: E402

ROW_KEYS = {"impl", "method", "shape", "data", "pass", "ms", "peak_mb", "tflops"}


def test_trained_like_data_has_the_target_loss():
    hidden, weight, labels = make_inputs(SHAPES["tiny"], "trained-like", torch.float32, "cpu")
    targets = peers.shifted(labels)
    nll = torch.nn.functional.cross_entropy((hidden @ weight.T).transpose(1, 2), targets, ignore_index=-100)
    assert 2.2 < nll.item() < 2.8


@pytest.mark.parametrize("method", ["irdro", "midranking"])
def test_every_cpu_impl_computes_the_same_loss(method):
    hidden, weight, labels = make_inputs(SHAPES["tiny"], "trained-like", torch.float32, "cpu")
    losses = {impl: peers.loss_fn(impl, hidden, weight, labels, method)().item()
              for impl in ("eager", "torch_native", "hardfocus") if peers.unavailable(impl, "cpu") is None}
    assert len(losses) >= 2
    for value in losses.values():
        assert value == pytest.approx(losses["eager"], rel=1e-5)


def test_compare_writes_the_schema(tmp_path):
    result = compare.main(["--shapes", "tiny", "--impls", "eager", "hardfocus", "liger", "--data", "trained-like",
                           "--methods", "irdro", "--iters", "1", "--accuracy-shapes", "tiny", "--out", str(tmp_path),
                           "--tag", "t", "--quiet"])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    for key in ("device", "date", "torch", "triton", "matmul_tflops", "rows"):
        assert key in saved
    assert {r["impl"] for r in saved["rows"]} == {"eager", "hardfocus"}
    assert any("skipped liger" in note for note in saved["notes"])
    for row in saved["rows"]:
        assert ROW_KEYS <= row.keys() and row["ms"] > 0 and row["tflops"] > 0
    errors = [r for r in saved["rows"] if "err_loss" in r]
    assert {r["impl"] for r in errors} == {"eager", "hardfocus"}
    assert all(r["err_grad_weight"] < 1e-4 for r in errors)      # fp32 inputs
    assert (tmp_path / "t.md").read_text().count("| tiny |") == len(saved["rows"])


def test_microbenchmarks_run():
    done = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_micro.py", "-q", "--benchmark-disable",
                           "-k", "tiny", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_accuracy_reference_is_fp64():
    """The accuracy reference stays fp64 end to end (one that rounded its logits to fp32
    once made eager fp32 look exact and the chunked implementations 50x worse)."""
    hidden, weight, labels = make_inputs(SHAPES["tiny"], "trained-like", torch.float64, "cpu")
    targets = peers.shifted(labels)
    ref = peers._eager(hidden, weight, targets, "mean")
    assert ref.dtype == torch.float64
    direct = torch.nn.functional.cross_entropy((hidden @ weight.T).transpose(1, 2), targets, ignore_index=-100)
    assert abs(ref.item() - direct.item()) < 1e-12 * abs(direct.item())


def test_accuracy_cli_writes_its_table(tmp_path):
    from benchmarks import accuracy as accuracy_cli

    result = accuracy_cli.main(["--shapes", "tiny", "--impls", "eager", "hardfocus", "--data", "random",
                                "--methods", "midranking", "--out", str(tmp_path), "--tag", "a"])
    assert [r["impl"] for r in result["rows"]] == ["eager", "hardfocus"]
    assert all(r["err_grad_weight"] < 1e-4 for r in result["rows"])
    assert (tmp_path / "a.md").read_text().count("| tiny |") == 2
