"""hardfocus-train and hardfocus-compare: outputs, resume, the user's mistakes, precision."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from hardfocus_fused.experiment import base  # noqa: E402
from hardfocus_fused.experiment.train import UserError, main, parse_args, train  # noqa: E402

SMALL = ["--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--quiet", "--impl", "torch"]


@pytest.fixture(autouse=True)
def tiny_base(tmp_path_factory, monkeypatch):
    """A quickly trained base model in a cache of the test session's own."""
    monkeypatch.setenv("HARDFOCUS_CACHE", str(tmp_path_factory.getbasetemp() / "hardfocus-cache"))
    monkeypatch.setattr(base, "DEFAULT_RECIPE", base.BaseRecipe(steps=20, batch_size=8))


def run(tmp_path, name, *extra):
    return train(parse_args([*SMALL, "--output-dir", str(tmp_path / name), *extra]))


def test_outputs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = run(tmp_path, "run", "--num-batches", "3", "--method", "midranking", "--n2", "0.5")
    out = tmp_path / "run"
    saved = json.loads((out / "log.json").read_text())
    assert saved["steps"][-1]["step"] == 3
    assert set(saved["heldout_before"]) == {"common", "informative", "noise", "mix"}
    assert (out / "training.png").stat().st_size > 10_000
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == len(tokenizer)
    step = log["steps"][0]
    assert sorted(step["weights"]) == [0.0, 1.0]  # MidRanking keeps max(1, floor(0.5 * 2)) = 1
    assert step["max_weight"] == 1.0 and step["ess"] == 1.0
    assert len(step["kinds"]) == 2 and abs(sum(step["weight_share"].values()) - 1) < 1e-6
    assert step["tokens_per_s"] > 0 and step["peak_memory_mb"] > 0
    assert all(torch.isfinite(torch.tensor(list(log["heldout_after"].values()))))
    # A saved run is a model directory the CLI (and transformers) can load as --model.
    again = run(tmp_path, "again", "--model", str(out / "model"), "--num-batches", "1", "--lr", "1e-3")
    assert again["heldout_before"]["mix"] == pytest.approx(log["heldout_after"]["mix"], rel=1e-4)


def test_one_document_per_row_and_unseen_positions():
    from hardfocus_fused.experiment.corpus import NEW_FACTS_FROM, builtin_examples, train_builtin_tokenizer
    from hardfocus_fused.experiment.train import data_streams

    args = parse_args([*SMALL, "--batch-size", "3"])
    tokenizer = train_builtin_tokenizer()
    _, stream = data_streams(args, tokenizer)
    batch = next(stream)
    assert batch["input_ids"].shape[0] == 3 and len(batch["kinds"]) == 3
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)  # padding masked
    seen_by_base = {text for _, text in __import__("itertools").islice(builtin_examples("train"), NEW_FACTS_FROM)}
    rows = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert not any(row in seen_by_base for row in rows)
    # Another seed, another order.
    other = next(data_streams(parse_args([*SMALL, "--batch-size", "3", "--seed", "1"]), tokenizer)[1])
    assert not torch.equal(other["input_ids"][:, :5], batch["input_ids"][:, :5])


def test_resume_continues_exactly(tmp_path):
    straight = run(tmp_path, "straight", "--num-batches", "4")
    run(tmp_path, "resumed", "--num-batches", "2", "--save-every", "1")
    resumed = train(
        parse_args(["--output-dir", str(tmp_path / "resumed"), "--resume", "--num-batches", "4", "--quiet"])
    )
    assert [s["step"] for s in resumed["steps"]] == [1, 2, 3, 4]
    for a, b in zip(straight["steps"], resumed["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    from safetensors.torch import load_file

    want = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_changed_settings(tmp_path):
    run(tmp_path, "r", "--num-batches", "1")
    with pytest.raises(UserError, match=r"--resume keeps the run's settings; these differ: --method midranking"):
        train(parse_args(["--output-dir", str(tmp_path / "r"), "--resume", "--method", "midranking", "--quiet"]))


def test_an_existing_run_is_not_overwritten(tmp_path):
    run(tmp_path, "o", "--num-batches", "1")
    with pytest.raises(UserError, match="already holds a run; pass --resume .* or --overwrite"):
        run(tmp_path, "o", "--num-batches", "1")
    assert len(run(tmp_path, "o", "--num-batches", "2", "--overwrite")["steps"]) == 2


def test_local_text_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "lorem ipsum dolor sit amet " * 5 for i in range(40)))
    log = run(tmp_path, "txt", "--dataset", str(corpus), "--num-batches", "2")
    assert len(log["steps"]) == 2 and set(log["heldout_before"]) == {"data"}


def test_a_dataset_too_small_for_one_batch(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("one document only")
    with pytest.raises(UserError, match="fewer than --batch-size 2 documents"):
        run(tmp_path, "small", "--dataset", str(corpus), "--eval-batches", "0")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--r", "-1"], "--r must be > 0"),
        (["--num-batches", "0"], "--num-batches must be > 0"),
        (["--impl", "triton"], "--impl triton needs a CUDA GPU"),
        (["--dataset", "missing.jsonl"], "no such file"),
        (["--resume", "--overwrite"], "exclude each other"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    if "--impl" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--output-dir", str(tmp_path / "x")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hardfocus-train: error: ") and message in err and "\n" not in err


def test_input_errors_are_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, message in (
        ([f"--dataset={bad}"], 'needs a "text" field'),
        ([f"--model={not_a_model}"], "not a model directory"),
        (
            ["--model", "nobody/no-such-model", "--output-dir", str(tmp_path / "hub")],
            "cannot load --model nobody/no-such-model",
        ),
    ):
        with pytest.raises(SystemExit):
            main([*SMALL, *argv])
        err = capsys.readouterr().err.strip()
        assert err.startswith("hardfocus-train: error: ") and message in err and "\n" not in err, err


def test_quiet_is_quiet(tmp_path, capsys):
    main([*SMALL, "--num-batches", "1", "--output-dir", str(tmp_path / "q")])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_fp32_master_weights_move_at_the_papers_learning_rate(tmp_path):
    """lr 5e-7 (the paper's, for OPT): with bf16 autocast over fp32 weights an update
    changes the weights; bf16 weights would not move, and are refused."""
    from safetensors.torch import load_file

    run(tmp_path, "lr", "--num-batches", "1", "--lr", "5e-7", "--precision", "bf16-autocast")
    before = load_file(base.ensure_base(say=None) / "model.safetensors")
    after = load_file(tmp_path / "lr" / "model" / "model.safetensors")
    changed = sum(int((after[k] != before[k]).sum()) for k in before)
    assert changed / sum(v.numel() for v in before.values()) > 0.9
    with pytest.raises(UserError, match="below what bf16 weights can represent.*--precision bf16-autocast"):
        run(tmp_path, "bf16", "--num-batches", "1", "--lr", "5e-7", "--precision", "bf16")


def test_compare_writes_table_json_and_plot(tmp_path):
    from hardfocus_fused.experiment.compare import main, run_compare

    result = run_compare(
        [
            "--methods",
            "uniform,midranking",
            "--seeds",
            "2",
            "--output-dir",
            str(tmp_path / "c"),
            *SMALL,
            "--num-batches",
            "2",
        ],
        say=lambda *a: None,
    )
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [
        ("uniform", 0),
        ("midranking", 0),
        ("uniform", 1),
        ("midranking", 1),
    ]
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "| midranking |" in table and "| base model |" in table and "±" in table
    assert (tmp_path / "c" / "compare.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "c" / "compare.json").read_text())["summary"]
    assert set(summary["uniform"]["delta"]) == {"common", "informative", "noise", "mix"}
    with pytest.raises(UserError, match="unknown"):
        run_compare(["--methods", "uniform,best", "--output-dir", str(tmp_path / "d")])
    assert main(["--methods", "uniform,best", "--output-dir", str(tmp_path / "d")]) == 2


def test_compare_exits_cleanly_and_says_what_it_does(tmp_path, capsys):
    """The console script runs ``sys.exit(main())``: status 0 and nothing on stderr after a
    comparison, one progress line as each run starts and ends, no spread with one seed."""
    from hardfocus_fused.experiment.compare import main

    status = main(
        [
            "--methods",
            "uniform,irdro",
            "--seeds",
            "1",
            "--output-dir",
            str(tmp_path / "c"),
            *SMALL,
            "--num-batches",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0 and captured.err == ""
    for line in ("[1/2] uniform, seed 0: training 1 batches", "[2/2] irdro, seed 0: held-out after"):
        assert line in captured.out
    table = (tmp_path / "c" / "compare.md").read_text()
    assert "one data order per method" in table and "±" not in table


def test_compare_help_names_the_options_it_passes_through(capsys):
    from hardfocus_fused.experiment.compare import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Every other hardfocus-train option applies to every run" in text
    for option in ("--model", "--lr", "--num-batches", "--dataset", "--threads"):
        assert option in text
    assert "--seed " not in text.split("applies to every run")[1]


def test_every_option_has_help_text():
    from hardfocus_fused.experiment.train import build_parser

    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_train_ends_with_the_change_and_how_to_compare(tmp_path, capsys):
    main(
        [
            *[a for a in SMALL if a != "--quiet"],
            "--num-batches",
            "1",
            "--lr",
            "2e-3",
            "--output-dir",
            str(tmp_path / "t"),
        ]
    )
    out = capsys.readouterr().out
    assert "before    after   change" in out and "informative" in out
    assert "do not say whether irdro helped" in out
    assert "hardfocus-compare --methods uniform,irdro --seeds 3" in out and "--lr 0.002" in out


def test_saving_draws_no_bar_of_its_own(tmp_path, capfd):
    """Checkpoints mid-run do not print transformers' or the hub's bars over the training bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # an earlier --quiet run in this process turned it off
    main(
        [
            *[a for a in SMALL if a != "--quiet"],
            "--num-batches",
            "2",
            "--save-every",
            "1",
            "--output-dir",
            str(tmp_path / "bars"),
        ]
    )
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # restored afterwards


def test_a_model_directory_without_tokenizer_is_one_line(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base.ensure_base(say=None)).save_pretrained(tmp_path / "bare")
    capsys.readouterr()  # transformers' own bars while saving the folder
    with pytest.raises(SystemExit):
        main([*SMALL, "--model", str(tmp_path / "bare"), "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert "has a model but no tokenizer" in err and "tokenizer.save_pretrained" in err and "\n" not in err


def test_thread_count(monkeypatch):
    """One thread for the built-in model unless OMP_NUM_THREADS or --threads says otherwise;
    the caller's count is restored after the run."""
    from hardfocus_fused.experiment.train import threads_for

    if torch.cuda.is_available():
        pytest.skip("the default applies to CPU runs")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with threads_for(parse_args(SMALL)) as n:
        assert n == 1
    with threads_for(parse_args([*SMALL, "--threads", "2"])) as n:
        assert n == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with threads_for(parse_args(SMALL)) as n:
        assert n == before
    assert torch.get_num_threads() == before
    with pytest.raises(UserError, match="--threads must be > 0"):
        parse_args([*SMALL, "--threads", "0"])


def test_downstream_evaluation_before_and_after(tmp_path):
    """lm-evaluation-harness on the in-memory model, offline: the built-in facts task."""
    pytest.importorskip("lm_eval")
    log = run(tmp_path, "eval", "--num-batches", "2", "--eval-tasks", "builtin_facts", "--eval-limit", "10")
    for when in ("downstream_before", "downstream_after"):
        assert 0.0 <= log[when]["builtin_facts"]["acc"] <= 1.0
    table = (tmp_path / "eval" / "downstream.md").read_text()
    assert "| builtin_facts | acc |" in table
