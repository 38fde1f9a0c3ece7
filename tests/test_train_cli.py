"""hardfocus-train: outputs, resume without lost progress, local text files."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from hardfocus_fused.train import parse_args, train  # noqa: E402

SMALL = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--quiet", "--impl", "torch"]


def run(tmp_path, name, *extra):
    return train(parse_args([*SMALL, "--output-dir", str(tmp_path / name), *extra]))


def test_outputs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = run(tmp_path, "run", "--num-batches", "3", "--method", "midranking", "--n2", "0.5")
    out = tmp_path / "run"
    assert json.loads((out / "log.json").read_text())["steps"][-1]["step"] == 3
    assert (out / "training.png").stat().st_size > 10_000
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == len(tokenizer)
    step = log["steps"][0]
    assert sorted(step["weights"]) == [0.0, 1.0]           # MidRanking keeps max(1, floor(0.5 * 2)) = 1
    assert step["max_weight"] == 1.0 and step["ess"] == 1.0
    assert step["tokens_per_s"] > 0 and step["peak_memory_mb"] > 0
    assert log["heldout_after"] < log["heldout_before"]
    # A saved run is a model directory the CLI (and transformers) can load as --model.
    again = run(tmp_path, "again", "--model", str(out / "model"), "--num-batches", "1", "--lr", "1e-3")
    assert again["heldout_before"] == pytest.approx(log["heldout_after"], rel=1e-4)


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path, "straight", "--num-batches", "4")
    run(tmp_path, "resumed", "--num-batches", "2", "--save-every", "1")
    resumed = train(parse_args(["--output-dir", str(tmp_path / "resumed"), "--resume", "--num-batches", "4",
                                "--quiet"]))
    assert [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4]
    for a, b in zip(straight["steps"], resumed["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    from safetensors.torch import load_file

    want = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_local_text_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "lorem ipsum dolor sit amet " * 20 for i in range(40)))
    log = run(tmp_path, "txt", "--dataset", str(corpus), "--num-batches", "2")
    assert len(log["steps"]) == 2


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train(parse_args(["--output-dir", str(tmp_path / "nothing"), "--resume"]))
