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


def test_frozen_head_rows_count_one_matmul_less():
    shape = SHAPES["tiny"]
    rows = compare.measure("hardfocus", "irdro", "tiny", "random", "frozen", torch.float32, "cpu", 1, True)
    by_pass = {r["pass"]: r for r in rows}
    assert all(r["head"] == "frozen" and "err_loss" not in r for r in rows)
    for kind, products in (("fwd", 1), ("bwd", 1), ("fwd+bwd", 2)):
        flops = by_pass[kind]["tflops"] * 1e12 * by_pass[kind]["ms"] * 1e-3
        assert flops == pytest.approx(products * 2 * shape.tokens * shape.hidden * shape.vocab, rel=1e-9)


def synthetic_result(ms: dict, matmul_tflops: float = 100.0) -> dict:
    """A result with a row for every pass of every case in ``targets.PLAN``; ``ms[(impl,
    method, shape, head, pass)]`` overrides the default 10 ms; TFLOP/s follow from ms."""
    from benchmarks import targets

    rows = []
    for impl, method, shape, data, head in targets.PLAN:
        s = SHAPES[shape]
        for kind in compare.PASSES:
            t = ms.get((impl, method, shape, head, kind), 10.0)
            flops = compare.matmuls(kind, head) * 2 * s.tokens * s.hidden * s.vocab
            rows.append({"impl": impl, "method": method, "shape": shape, "data": data, "head": head, "pass": kind,
                         "ms": t, "peak_mb": 100.0 if impl == "hardfocus" else 150.0, "tflops": flops / t / 1e9})
    return {"device": "NVIDIA H100", "date": "2026-11-24T00:00:00", "torch": "2.11", "triton": "3.6.0",
            "dtype": "bfloat16", "matmul_tflops": matmul_tflops, "iters": 1, "memory": "", "notes": [],
            "rows": rows}


def test_targets_verdicts():
    from benchmarks import targets

    ms = {("hardfocus", "irdro", "llama3-8b", "trainable", "fwd+bwd"): 7.0,        # 0.7x cce: met
          ("hardfocus", "irdro", "gemma2-2b", "trainable", "fwd+bwd"): 9.0,        # 0.9x cce: missed
          ("hardfocus", "midranking", "llama3-8b", "trainable", "bwd"): 5.0,       # 0.5x: met
          ("hardfocus", "irdro", "llama3-8b", "frozen", "bwd"): 6.5}               # 0.65x: missed
    verdicts = {(v["target"], v["shape"]): v for v in targets.evaluate(synthetic_result(ms))}
    assert len(verdicts) == sum(len(t.shapes) for t in targets.TARGETS)
    assert all(v["verdict"] != "not measured" for v in verdicts.values())
    cce = "IR-DRO fwd+bwd time / Cut Cross-Entropy's"
    assert verdicts[(cce, "llama3-8b")]["value"] == pytest.approx(0.7)
    assert verdicts[(cce, "llama3-8b")]["verdict"] == "met"
    assert verdicts[(cce, "gemma2-2b")]["verdict"] == "missed"
    assert verdicts[("MidRanking bwd time / IR-DRO bwd time", "llama3-8b")]["verdict"] == "met"
    assert verdicts[("MidRanking bwd time / IR-DRO bwd time", "gemma2-2b")]["verdict"] == "missed"   # 1.0
    assert verdicts[("frozen-head bwd time / trainable-head bwd time", "llama3-8b")]["verdict"] == "missed"
    assert verdicts[("IR-DRO fwd+bwd peak extra memory / Cut Cross-Entropy's", "gemma2-2b")]["value"] == \
        pytest.approx(100 / 150)
    forward = verdicts[("forward TFLOP/s / dense matmul TFLOP/s", "llama3-8b")]
    s = SHAPES["llama3-8b"]
    assert forward["value"] == pytest.approx(2 * s.tokens * s.hidden * s.vocab / 10e-3 / 1e12 / 100.0)


def test_targets_without_rows_are_not_measured(tmp_path):
    from benchmarks import targets

    result = synthetic_result({})
    result["rows"] = [r for r in result["rows"] if r["impl"] != "cce"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    checked = targets.main(["--from", str(path), "--out", str(tmp_path), "--tag", "v"])
    missing = {v["target"] for v in checked["targets"] if v["verdict"] == "not measured"}
    assert missing == {"IR-DRO fwd+bwd time / Cut Cross-Entropy's",
                       "IR-DRO fwd+bwd peak extra memory / Cut Cross-Entropy's"}
    assert (tmp_path / "v.md").read_text().count("| not measured |") == 4


def test_targets_run_measures_its_plan(tmp_path, monkeypatch):
    from benchmarks import targets

    monkeypatch.setattr(targets, "PLAN", (("hardfocus", "irdro", "tiny", "random", "frozen"),
                                          ("cce", "irdro", "tiny", "random", "trainable")))
    result = targets.main(["--iters", "1", "--out", str(tmp_path), "--tag", "m"])
    assert {(r["impl"], r["head"]) for r in result["rows"]} == {("hardfocus", "frozen")}
    assert any(note.startswith("skipped cce") for note in result["notes"])
    assert json.loads((tmp_path / "m.json").read_text())["targets"] == result["targets"]


def test_targets_by_shape_write_as_they_go(tmp_path, monkeypatch):
    from benchmarks import compare, targets

    monkeypatch.setattr(targets, "PLAN", (("hardfocus", "irdro", "tiny", "random", "frozen"),
                                          ("hardfocus", "irdro", "cpu", "random", "frozen")))
    written = []
    real_run = compare.run

    def spy(args, cases, on_case):
        def record(result):
            written.append(json.loads((tmp_path / "s.json").read_text()) if on_case(result) is None else None)
        return real_run(args, cases, record)

    monkeypatch.setattr(compare, "run", spy)
    result = targets.main(["--iters", "1", "--out", str(tmp_path), "--tag", "s", "--shapes", "tiny"])
    assert {r["shape"] for r in result["rows"]} == {"tiny"}          # the other shape is not measured
    assert len(written) == 1 and len(written[0]["rows"]) == 3          # the file existed after the case


def test_gpu_session_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_skip_analysis_drops_tiles_and_measures_the_cost():
    from benchmarks import skip_analysis

    rows = skip_analysis.main(["--shape", "tiny", "--block-n", "16", "--block-v", "16", "--log2-eps", "-4", "-60"])
    coarse, exact = rows
    assert 0 < coarse["tiles_kept"] < 1 and coarse["grad_hidden_err_norm"] > 1e-3
    assert exact["tiles_kept"] == 1 and exact["grad_hidden_err_max"] == exact["grad_weight_err_max"] == 0


def test_sweep_writes_a_row_per_case(tmp_path, monkeypatch):
    """The sweep's cases on a micro head (CPU, interpreter): every case is timed, the JSON
    is rewritten after each, and an exhausted time budget records the cases it skipped."""
    from benchmarks import sweep
    from benchmarks.shapes import Shape
    from hardfocus_fused.kernels import KernelConfig

    monkeypatch.setitem(sweep.SHAPES, "micro", Shape("micro", 32, 16, 64, seq_len=16))
    monkeypatch.setattr(sweep, "FORWARD", (None, KernelConfig(block_n=16, block_v=32, block_h=16)))
    monkeypatch.setattr(sweep, "BACKWARD", (None,))
    monkeypatch.setattr(sweep, "MATMUL_CHUNKS", (2**20,))
    result = sweep.main(["--out", str(tmp_path), "--heads", "micro"])
    rows = result["rows"]
    assert [(r["pass"], r["strategy"]) for r in rows] == [("fwd", "-"), ("fwd", "-"), ("bwd", "fused"),
                                                         ("bwd", "matmul")]
    assert all(r["ms"] > 0 and "error" not in r for r in rows)
    assert "(default)" in rows[0]["config"] and "16x32x16" in rows[1]["config"]
    (written,) = tmp_path.glob("sweep-cpu-*.json")
    assert json.loads(written.read_text())["rows"] == rows
    skipped = sweep.main(["--out", str(tmp_path), "--heads", "micro", "--budget-s", "0"])["rows"]
    assert len(skipped) == 4 and all(r["error"] == "time budget" for r in skipped)
