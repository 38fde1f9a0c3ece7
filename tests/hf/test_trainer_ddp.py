"""The stock transformers.Trainer on 2 gloo processes (DDP) with group=: the weights are
over the global batch, so training equals one process on the whole batch."""

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hardfocus_fused import apply_hardfocus  # noqa: E402
from hardfocus_fused.hf.trainer import AccumulationCallback  # noqa: E402
from hardfocus_fused.weighting.accumulate import AccumulatedIRDRO  # noqa: E402

from helpers import assert_same_updates, state_of  # noqa: E402
from hf_models import Rows, sgd_args, tiny_model  # noqa: E402
from ranks import finish_group  # noqa: E402

WORLD = 2
ROWS = 8  # one global batch per epoch: every step sees the same 8 rows in any order or split


def train(model, out, batch_size, accumulation, callbacks=(), distributed=False):
    args = sgd_args(out, batch_size, accumulation, ddp_backend="gloo" if distributed else None)
    transformers.Trainer(model=model, args=args, train_dataset=Rows(n=ROWS), callbacks=list(callbacks)).train()
    return state_of(model)


def _runs(base, group):
    """name -> (model, per-device batch, accumulation steps, callbacks) for the 2-rank runs."""
    irdro = apply_hardfocus(copy.deepcopy(base), method="irdro", r=0.5, impl="torch", group=group)
    mean = apply_hardfocus(copy.deepcopy(base), method="mean", impl="torch", group=group)
    accumulated = copy.deepcopy(base)
    rule = AccumulatedIRDRO(accumulated.parameters(), r=0.5)
    apply_hardfocus(accumulated, method=rule, impl="torch", group=group)
    return {
        "irdro": (irdro, ROWS // WORLD, 1, []),
        "mean, accumulated": (mean, ROWS // WORLD // 2, 2, []),
        "AccumulatedIRDRO": (accumulated, ROWS // WORLD // 2, 2, [AccumulationCallback(rule)]),
    }


def _worker(rank, port, out, initial, references):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    _train_and_check(out, initial, references)
    finish_group()  # the Trainer started the group and leaves it to us


def _train_and_check(out, initial, references):
    import torch.distributed as dist

    base = tiny_model("llama")
    transformers.TrainingArguments(output_dir=str(out), use_cpu=True, ddp_backend="gloo")  # starts the group
    assert dist.get_world_size() == WORLD
    for name, (model, batch, accumulation, callbacks) in _runs(base, dist.group.WORLD).items():
        state = train(model, out / name, batch, accumulation, callbacks, distributed=True)
        assert_same_updates(initial, state, references[name], context=f"{name}: ")

    # A weighting rule under several processes cannot know the Trainer's loss factor
    # without AccumulationCallback: an error, not a gradient off by the world size.
    model = copy.deepcopy(base)
    apply_hardfocus(model, method=AccumulatedIRDRO(model.parameters()), impl="torch", group=dist.group.WORLD)
    rows = Rows(n=ROWS)
    with pytest.raises(ValueError, match="AccumulationCallback"):
        model(input_ids=rows.ids[:2], labels=rows.labels[:2], num_items_in_batch=torch.tensor(20))


def test_trainer_under_ddp_equals_one_process_on_the_global_batch(tmp_path):
    base = tiny_model("llama")
    references = {}
    for name, method in [("irdro", "irdro"), ("mean, accumulated", "mean"), ("AccumulatedIRDRO", "irdro")]:
        model = apply_hardfocus(copy.deepcopy(base), method=method, r=0.5, impl="torch")
        references[name] = train(model, tmp_path / "single" / name, ROWS, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    initial = state_of(base)
    mp.spawn(_worker, args=(port, tmp_path, initial, references), nprocs=WORLD, join=True)
