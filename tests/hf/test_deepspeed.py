"""DeepSpeed ZeRO-3 and ZeRO-2 under the stock transformers.Trainer, on 2 gloo processes with
DeepSpeed's CPU accelerator: a patched tiny Llama with ``group=`` trains exactly like one
process on the whole batch (every parameter's update over two SGD steps), so the
partitioned ``lm_head`` weight reaches the loss gathered, never empty."""

import copy
import os
import socket

import pytest
import torch.multiprocessing as mp

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
deepspeed = pytest.importorskip("deepspeed")

from hardfocus_fused import apply_hardfocus  # noqa: E402

from helpers import assert_same_updates, state_of  # noqa: E402
from hf_models import Rows, sgd_args, tiny_model  # noqa: E402
from ranks import finish_group  # noqa: E402

WORLD = 2
ROWS = 8  # one global batch per epoch: every step sees the same 8 rows in any order or split
STAGES = (2, 3)


def zero_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",  # the Trainer's max_grad_norm=0: none (left out, accelerate clips at 1.0)
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the Trainer's plain SGD
    }


def train(model, out, batch_size, stage=None):
    """Two SGD steps; the parameters after them, gathered from their ZeRO partitions."""
    config = dict(deepspeed=zero_config(stage), ddp_backend="gloo") if stage else {}
    args = sgd_args(out, batch_size, 1, **config)
    transformers.Trainer(model=model, args=args, train_dataset=Rows(n=ROWS)).train()
    if stage != 3:  # whole parameters on every rank
        return state_of(model)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return state_of(model)


def _worker(rank, port, out, initial, reference):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    import torch.distributed as dist

    base = tiny_model("llama")  # built before any DeepSpeed config exists: not partitioned at construction
    transformers.TrainingArguments(output_dir=str(out), use_cpu=True, ddp_backend="gloo")  # starts the group
    assert dist.get_world_size() == WORLD
    for stage in STAGES:
        model = apply_hardfocus(copy.deepcopy(base), method="irdro", r=0.5, impl="torch", group=dist.group.WORLD)
        state = train(model, out / f"zero{stage}", ROWS // WORLD, stage)
        assert_same_updates(initial, state, reference, context=f"ZeRO-{stage}: ")
    finish_group()


def test_trainer_under_zero3_and_zero2_equals_one_process(tmp_path):
    base = tiny_model("llama")
    initial = state_of(base)
    reference = train(apply_hardfocus(copy.deepcopy(base), method="irdro", r=0.5, impl="torch"), tmp_path / "one", ROWS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, tmp_path, initial, reference), nprocs=WORLD, join=True)
