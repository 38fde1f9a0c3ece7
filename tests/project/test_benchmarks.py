"""The benchmark harness runs end to end on the CPU and writes the documented schema."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
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
    losses = {
        impl: peers.loss_fn(impl, hidden, weight, labels, method)().item()
        for impl in ("eager", "torch_native", "hardfocus")
        if peers.unavailable(impl, "cpu") is None
    }
    assert len(losses) >= 2
    for value in losses.values():
        assert value == pytest.approx(losses["eager"], rel=1e-5)


def test_compare_writes_the_schema(tmp_path):
    result = compare.main(
        [
            "--shapes",
            "tiny",
            "--impls",
            "eager",
            "hardfocus",
            "liger",
            "--data",
            "trained-like",
            "--methods",
            "irdro",
            "--iters",
            "1",
            "--accuracy-shapes",
            "tiny",
            "--out",
            str(tmp_path),
            "--tag",
            "t",
            "--quiet",
        ]
    )
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
    assert all(r["err_grad_weight"] < 1e-4 for r in errors)  # fp32 inputs
    assert (tmp_path / "t.md").read_text().count("| tiny |") == len(saved["rows"])


def test_microbenchmarks_run():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/test_micro.py",
            "-q",
            "--benchmark-disable",
            "-k",
            "tiny",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
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

    result = accuracy_cli.main(
        [
            "--shapes",
            "tiny",
            "--impls",
            "eager",
            "hardfocus",
            "--data",
            "random",
            "--methods",
            "midranking",
            "--out",
            str(tmp_path),
            "--tag",
            "a",
        ]
    )
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


def synthetic_result(ms: dict, matmul_tflops: float = 100.0, peak: dict | None = None) -> dict:
    """A result with a row for every pass of every case in ``targets.PLAN``; ``ms[(impl,
    method, shape, head, pass)]`` overrides the default 10 ms, ``peak[impl]`` the peak
    (100 MiB ours, 150 a peer's); TFLOP/s follow from ms; the ``fwd+bwd`` rows on the
    accuracy shape carry errors of 1e-2 (ours 5e-3)."""
    from benchmarks import targets

    rows = []
    for impl, method, shape, data, head in targets.PLAN:
        s = SHAPES[shape]
        for kind in compare.PASSES:
            t = ms.get((impl, method, shape, head, kind), 10.0)
            flops = compare.matmuls(kind, head) * 2 * s.tokens * s.hidden * s.vocab
            mb = (peak or {}).get(impl, 100.0 if impl == "hardfocus" else 150.0)
            row = {
                "impl": impl,
                "method": method,
                "shape": shape,
                "data": data,
                "head": head,
                "pass": kind,
                "ms": t,
                "peak_mb": mb,
                "tflops": flops / t / 1e9,
            }
            if shape == targets.ACCURACY_SHAPE and kind == "fwd+bwd":
                err = 5e-3 if impl == "hardfocus" else 1e-2
                row.update(err_loss=err, err_grad_hidden=err, err_grad_weight=err)
            rows.append(row)
    return {
        "device": "NVIDIA H200",
        "date": "2026-12-02T00:00:00",
        "torch": "2.11",
        "triton": "3.6.0",
        "dtype": "bfloat16",
        "matmul_tflops": matmul_tflops,
        "iters": 1,
        "memory": "",
        "notes": [],
        "rows": rows,
    }


def test_targets_verdicts():
    from benchmarks import targets

    llama = SHAPES["llama3-8b"]
    floor_ms = 4 * 2 * llama.tokens * llama.hidden * llama.vocab / 100e12 * 1e3  # at 100 TFLOP/s
    ms = {
        ("hardfocus", "irdro", "llama3-8b", "trainable", "fwd+bwd"): 1.2 * floor_ms,
        ("cce_exact", "irdro", "llama3-8b", "trainable", "fwd+bwd"): 1.2 * floor_ms / 0.85,  # 0.85x: met
        ("cce_exact", "irdro", "gemma2-2b", "trainable", "fwd+bwd"): 10.5,  # 0.95x: missed
        ("cce", "irdro", "llama3-8b", "trainable", "fwd+bwd"): 1.2 * floor_ms / 1.5,  # reported
        ("liger", "irdro", "llama3-8b", "trainable", "fwd+bwd"): 1.2 * floor_ms / 0.75,
        ("torch_compile", "irdro", "llama3-8b", "trainable", "fwd+bwd"): 1.2 * floor_ms,  # 1.0x: met
        ("hardfocus", "midranking", "llama3-8b", "trainable", "bwd"): 5.0,  # 0.5x: met
        ("hardfocus", "irdro", "llama3-8b", "frozen", "bwd"): 7.5,  # 0.75x: missed
        ("hardfocus", "irdro", "llama3-8b", "trainable", "fwd"): floor_ms / 4 / 0.65,
    }  # 65%: missed
    verdicts = {
        (v["target"], v["shape"]): v for v in targets.evaluate(synthetic_result(ms, peak={"liger": 90.0, "cce": 90.0}))
    }
    assert len(verdicts) == sum(len(t.shapes) for t in targets.TARGETS)
    assert all(v["verdict"] != "not measured" for v in verdicts.values())

    def check(what, shape, value, verdict):
        (found,) = [v for (target, s), v in verdicts.items() if target.startswith(what) and s == shape]
        assert found["value"] == pytest.approx(value) and found["verdict"] == verdict, found

    check("IR-DRO fwd+bwd time / 4-product floor", "llama3-8b", 1.2, "met")
    check("IR-DRO fwd+bwd time / Cut Cross-Entropy's, filter_eps=None", "llama3-8b", 0.85, "met")
    check("IR-DRO fwd+bwd time / Cut Cross-Entropy's, filter_eps=None", "gemma2-2b", 10 / 10.5, "missed")
    check("IR-DRO fwd+bwd time / Cut Cross-Entropy's default", "llama3-8b", 1.5, "reported")
    check("IR-DRO fwd+bwd time / Liger's", "llama3-8b", 0.75, "met")
    check("IR-DRO fwd+bwd time / Liger's", "gemma2-2b", 1.0, "missed")
    check("IR-DRO fwd+bwd time / torch.compile's", "llama3-8b", 1.0, "met")
    check("IR-DRO fwd+bwd peak extra memory / Liger's", "llama3-8b", 100 / 90, "missed")
    check("IR-DRO fwd+bwd peak extra memory / Cut Cross-Entropy's", "llama3-8b", 100 / 90, "met")  # <= 1.2
    check("MidRanking bwd time / IR-DRO bwd time", "llama3-8b", 0.5, "met")
    check("MidRanking bwd time / IR-DRO bwd time", "gemma2-2b", 1.0, "missed")
    check("frozen-head bwd time / trainable-head bwd time", "llama3-8b", 0.75, "missed")
    assert verdicts[("frozen-head bwd time / trainable-head bwd time", "llama3-8b")]["missed_by"] == pytest.approx(
        0.75 / 0.7 - 1
    )
    check("gradient error vs fp64 / README tolerance", "mid", 5e-3 / 2e-2, "met")
    check("gradient error vs fp64 / best peer's", "mid", 0.5, "met")
    check("forward TFLOP/s / dense matmul TFLOP/s", "llama3-8b", 0.65, "missed")
    assert verdicts[("forward TFLOP/s / dense matmul TFLOP/s", "llama3-8b")]["missed_by"] == pytest.approx(0.05 / 0.7)
    table = targets.verdict_table(list(verdicts.values()))
    assert "| reported |" in table and "| missed by 7% |" in table


def test_targets_without_rows_are_not_measured(tmp_path):
    from benchmarks import targets

    result = synthetic_result({})
    result["rows"] = [r for r in result["rows"] if r["impl"] not in ("cce", "cce_exact")]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    checked = targets.main(["--from", str(path), "--out", str(tmp_path), "--tag", "v"])
    missing = {v["target"] for v in checked["targets"] if v["verdict"] == "not measured"}
    assert missing == {
        "IR-DRO fwd+bwd time / Cut Cross-Entropy's, filter_eps=None",
        "IR-DRO fwd+bwd time / Cut Cross-Entropy's default (filtered)",
        "IR-DRO fwd+bwd peak extra memory / Cut Cross-Entropy's",
    }
    assert (tmp_path / "v.md").read_text().count("| not measured |") == 6
    # the accuracy comparison uses the peers that were measured
    assert {v["verdict"] for v in checked["targets"] if "best peer" in v["target"]} == {"met"}


def test_targets_run_measures_its_plan(tmp_path, monkeypatch):
    from benchmarks import targets

    monkeypatch.setattr(
        targets,
        "PLAN",
        (("hardfocus", "irdro", "tiny", "random", "frozen"), ("cce", "irdro", "tiny", "random", "trainable")),
    )
    result = targets.main(["--iters", "1", "--out", str(tmp_path), "--tag", "m"])
    assert {(r["impl"], r["head"]) for r in result["rows"]} == {("hardfocus", "frozen")}
    assert any(note.startswith("skipped cce") for note in result["notes"])
    assert json.loads((tmp_path / "m.json").read_text())["targets"] == result["targets"]


def test_targets_by_shape_write_as_they_go(tmp_path, monkeypatch):
    from benchmarks import compare, targets

    monkeypatch.setattr(
        targets,
        "PLAN",
        (("hardfocus", "irdro", "tiny", "random", "frozen"), ("hardfocus", "irdro", "cpu", "random", "frozen")),
    )
    written = []
    real_run = compare.run

    def spy(args, cases, on_case):
        def record(result):
            written.append(json.loads((tmp_path / "s.json").read_text()) if on_case(result) is None else None)

        return real_run(args, cases, record)

    monkeypatch.setattr(compare, "run", spy)
    result = targets.main(["--iters", "1", "--out", str(tmp_path), "--tag", "s", "--shapes", "tiny"])
    assert {r["shape"] for r in result["rows"]} == {"tiny"}  # the other shape is not measured
    assert len(written) == 1 and len(written[0]["rows"]) == 3  # the file existed after the case


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
    from hardfocus_fused.kernels.config import KernelConfig

    monkeypatch.setitem(sweep.SHAPES, "micro", Shape("micro", 32, 16, 64, seq_len=16))
    monkeypatch.setattr(sweep, "FORWARD", (None, KernelConfig(block_n=16, block_v=32, block_h=16)))
    monkeypatch.setattr(sweep, "BACKWARD", (None,))
    monkeypatch.setattr(sweep, "MATMUL_CHUNKS", (2**20,))
    result = sweep.main(["--out", str(tmp_path), "--heads", "micro"])
    rows = result["rows"]
    assert [(r["pass"], r["strategy"]) for r in rows] == [
        ("fwd", "-"),
        ("fwd", "-"),
        ("bwd", "fused"),
        ("bwd", "matmul"),
    ]
    assert all(r["ms"] > 0 and "error" not in r for r in rows)
    assert "(default)" in rows[0]["config"] and "16x32x16" in rows[1]["config"]
    (written,) = tmp_path.glob("sweep-cpu-*.json")
    assert json.loads(written.read_text())["rows"] == rows
    skipped = sweep.main(["--out", str(tmp_path), "--heads", "micro", "--budget-s", "0"])["rows"]
    assert len(skipped) == 4 and all(r["error"] == "time budget" for r in skipped)


def _sweep_row(head, kind, strategy, ms, **params):
    from hardfocus_fused.kernels.config import KernelConfig

    row = {"head": head, "pass": kind, "strategy": strategy, "config": "", "ms": ms}
    if strategy == "matmul":
        row["matmul_chunk_bytes"] = params["chunk"]
    else:
        row["params"] = dataclasses.asdict(KernelConfig(**params))
    return row


def test_tuned_applies_the_sweeps_fastest_configs_in_process():
    """``benchmarks.tuned``: the fastest forward and backward per swept head become the
    defaults for half precision on that head (not fp32, not other heads, not small N), the
    strategy with the least summed backward time becomes "auto"'s, and undo() restores."""
    from benchmarks import tuned
    from hardfocus_fused.kernels import config
    from hardfocus_fused.op import dispatch

    sweep = {
        "rows": [
            _sweep_row("llama3-8b", "fwd", "-", 30.0, block_n=128, block_v=128),
            _sweep_row("llama3-8b", "fwd", "-", 25.0, block_n=64, block_v=256),
            _sweep_row("llama3-8b", "bwd", "fused", 70.0, block_n=128, block_v=64),
            _sweep_row("llama3-8b", "bwd", "matmul", 75.0, chunk=2**30),
            _sweep_row("gemma2-2b", "bwd", "fused", 40.0, block_n=64),
            _sweep_row("gemma2-2b", "bwd", "matmul", 45.0, chunk=2**28),
            {"head": "gemma2-2b", "pass": "fwd", "strategy": "-", "config": "", "error": "time budget"},
        ]
    }
    choices = tuned.best(sweep)
    assert [c.head for c in choices] == ["llama3-8b", "gemma2-2b"]
    assert choices[0].forward.block_v == 256 and choices[0].backward.block_v == 64
    assert choices[1].forward is None and choices[1].matmul_chunk_bytes == 2**28
    assert tuned.strategy(choices) == "fused"  # 70 + 40 < 75 + 45, though matmul won on gemma
    heads = [
        (16384, 128256, 4096, torch.bfloat16),
        (16384, 128256, 4096, torch.float32),
        (4096, 32000, 1024, torch.bfloat16),
        (512, 128256, 4096, torch.bfloat16),
    ]
    before = {head: config.default_configs(*head) for head in heads}
    applied = tuned.apply(choices)
    try:
        got = config.default_configs(16384, 128256, 4096, torch.bfloat16)
        assert got.forward.block_v == 256 and got.backward.block_v == 64
        assert config.default_configs(1024, 128256, 4096, torch.bfloat16).forward.block_v == 256  # any N > 512
        assert config.default_configs(16384, 128256, 4096, torch.float32) == before[heads[1]]  # not fp32
        assert config.default_configs(8192, 256000, 2304, torch.bfloat16).matmul_chunk_bytes == 2**28
        assert config.default_configs(*heads[2]) == before[heads[2]]  # not swept
        assert config.default_configs(*heads[3]) == before[heads[3]]  # small N
        assert dispatch.resolve_backward("auto") == "fused" and dispatch.resolve_backward("matmul") == "matmul"
        assert applied.describe()["strategy"] == "fused"
    finally:
        applied.undo()
    assert {head: config.default_configs(*head) for head in heads} == before
    assert dispatch.resolve_backward("auto") == "auto"


def test_gpu_session_all_runs_its_stages_and_packs_the_results(tmp_path):
    """``gpu_session.sh all`` on the CPU with the micro head: every stage runs under its
    limit, the targets are measured with the sweep's configs, and what comes back is at
    most three files (session log, device notes, one archive of the results)."""
    import os
    import tarfile

    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "HARDFOCUS_SESSION_WORK": str(tmp_path / "work"),
        "SWEEP_ARGS": "--heads micro",
        "TARGETS_ARGS": "--shapes micro",
        "TRITON_INTERPRET": "1",
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "all"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu.txt", "results.tar.gz", "session.log"]
    notes = (out / "gpu.txt").read_text()
    for stage in ("smoke", "sweep", "targets"):
        assert f"stage {stage}: exit 0" in notes, notes
    assert "stage profile: exit" in notes  # needs ncu and CUDA: fails here, the script goes on
    assert "=== targets" in (out / "session.log").read_text()
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
        (targets_json,) = [n for n in names if n.startswith("results/targets-") and n.endswith(".json")]
        result = json.load(archive.extractfile(targets_json))
    assert any(n.startswith("results/sweep-") for n in names)
    assert result["configs"]["heads"][0]["head"] == "micro"


def test_liger_adapter_matches_eager_in_the_interpreter():
    """The Liger-Kernel peer as the benchmark calls it (``reduction="none"`` + our
    weighting), on the CPU through Triton's interpreter: same loss and gradients as eager."""
    pytest.importorskip("liger_kernel")
    hidden, weight, labels = make_inputs(SHAPES["micro"], "trained-like", torch.float32, "cpu")
    ref = peers.loss_fn("eager", hidden, weight, labels, "irdro")()
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss = peers.loss_fn("liger", hidden, weight, labels, "irdro")()
    grads = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
