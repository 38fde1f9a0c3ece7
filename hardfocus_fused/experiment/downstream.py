"""Downstream evaluation of an in-memory model with lm-evaluation-harness, as the paper
evaluates (0-shot piqa, hellaswag, winogrande, arc_challenge, boolq, mmlu; ``pip install
'hardfocus-fused[eval]'``, and hub access for those tasks' data).

``"builtin_facts"`` is a local task made from the built-in corpus: for each creature of
the facts the base model has never seen, "the <name> lives in" with the ten homes as the
choices (chance: 10%).  It needs no download, so it also tests the wiring offline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

BUILTIN_TASK = "builtin_facts"
SOTU_TASK = "sotu_next_sentence"  # speeches.TASK


def builtin_task_dir(root: Path) -> Path:
    """Write the ``builtin_facts`` task (YAML and JSONL) under ``root``; returns the folder."""
    from .corpus import _FACTS, _HOMES

    folder = root / BUILTIN_TASK
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": f"the {name} lives in", "choices": [f" {home}" for home in _HOMES], "answer": _HOMES.index(home)}
        for name, (home, _, _) in sorted(_FACTS["new"].items())
    ]
    data = folder / "facts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{BUILTIN_TASK}.yaml").write_text(
        f"task: {BUILTIN_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    train_until: int = 2016,
) -> dict[str, dict[str, float]]:
    """0-shot lm-evaluation-harness metrics ``{task: {metric: value}}`` of ``model`` as it is
    in memory (a patched model evaluates with its own logits: no labels are passed).
    ``sotu_next_sentence`` is built from the addresses after ``train_until``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(
            "downstream evaluation needs lm-evaluation-harness: pip install 'hardfocus-fused[eval]'"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        paths = [include_path] if include_path else []
        if BUILTIN_TASK in tasks:
            paths.append(str(builtin_task_dir(Path(tmp))))
        if SOTU_TASK in tasks:
            from .speeches import task_dir

            paths.append(str(task_dir(Path(tmp), train_until)))
        manager = TaskManager(include_path=paths or None)
        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=0, limit=limit, log_samples=False
        )
        model.train(was_training)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            name.split(",")[0]: float(value)
            for name, value in metrics.items()
            if isinstance(value, (int, float)) and "stderr" not in name and name != "sample_len"
        }
    return results
