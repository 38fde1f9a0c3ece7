"""group=: weights over the global batch of two gloo ranks; DDP's averaging gives exactly the
single-process gradient of the concatenated batch."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import LossHead
from ranks import spawn_ranks

H_IN, H, V, T = 6, 8, 23, 7
SPLIT = [3, 2]  # rank 0 holds 3 sequences, rank 1 holds 2


def global_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), T, H_IN, generator=gen) * 3
    labels = torch.randint(0, V, (sum(SPLIT), T), generator=gen)
    labels[0, :3] = -100  # ragged: ranks hold different token counts too
    labels[4, 4:] = -100
    return x, labels


def _worker(rank, world, method):
    x, labels = global_batch()
    ref_model = LossHead(H_IN, H, V, impl="torch")
    ref_loss, ref_stats = ref_model(x, labels, method=method, n1=0.2, n2=0.4, r=0.7)
    ref_loss.backward()

    start = sum(SPLIT[:rank])
    mine = slice(start, start + SPLIT[rank])
    ddp = nn.parallel.DistributedDataParallel(LossHead(H_IN, H, V, impl="torch"))
    loss, stats = ddp(x[mine], labels[mine], method=method, n1=0.2, n2=0.4, r=0.7, group=dist.group.WORLD)
    loss.backward()  # DDP averages the gradients over the ranks

    torch.testing.assert_close(stats.weights, ref_stats.weights[mine], rtol=1e-6, atol=1e-7)
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ddp.module.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["irdro", "midranking", "mean"])
def test_ddp_gradients_equal_single_process_on_the_global_batch(method, tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    spawn_ranks(_worker, str(tmp_path / "init"), method)


def hf_setup(rank):
    """``(base model, ids, mask, labels, reference, this rank's rows)``: the reference is a
    patched copy of ``base`` after one backward over all 4 sequences; rank 0 holds 3 of
    them, rank 1 holds 1."""
    from hardfocus_fused import apply_hardfocus

    from hf_models import left_padded_batch, tiny_model

    base = tiny_model("llama")
    ids, mask, labels = left_padded_batch()
    ref = apply_hardfocus(copy.deepcopy(base), method="irdro", r=0.5, impl="torch")
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return base, ids, mask, labels, ref, slice(0, 3) if rank == 0 else slice(3, 4)


def patch_global(model):
    """The reference's weighting over the group's global batch."""
    from hardfocus_fused import apply_hardfocus

    return apply_hardfocus(model, method="irdro", r=0.5, impl="torch", group=dist.group.WORLD)


def _hf_worker(rank, world):
    base, ids, mask, labels, ref, mine = hf_setup(rank)
    for patch_first in (True, False):
        model = copy.deepcopy(base)
        if patch_first:
            patch_global(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        if not patch_first:  # patches the model inside DDP
            patch_global(ddp)
        ddp(input_ids=ids[mine], attention_mask=mask[mine], labels=labels[mine]).loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{patch_first=}: {name}")


def test_patched_hf_model_under_ddp(tmp_path):
    pytest.importorskip("transformers")
    spawn_ranks(_hf_worker, str(tmp_path / "init"))


def _sharded(base, mesh, layout):
    """A patched copy of ``base`` under FSDP2 with ``lm_head`` sharded as ``layout`` says."""
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(base)
    if layout != "patched after sharding":
        patch_global(model)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if layout != "head in the root unit":
        # Its own unit: the weight is gathered only inside lm_head's call, and freed after.
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)
    if layout == "patched after sharding":
        patch_global(model)  # the probe runs through the sharded model
    return model


FSDP_LAYOUTS = ["head in the root unit", "head in its own unit", "patched after sharding"]


def _fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    base, ids, mask, labels, ref, mine = hf_setup(rank)
    mesh = init_device_mesh("cpu", (world,))
    for layout in FSDP_LAYOUTS:
        model = _sharded(base, mesh, layout)
        for step in range(2):  # the second step reuses the resharded head
            model.zero_grad()
            model(input_ids=ids[mine], attention_mask=mask[mine], labels=labels[mine]).loss.backward()
            for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(
                    p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6, msg=f"{layout}, step {step}: {name}"
                )


def test_fsdp2_on_cpu(tmp_path):
    """FSDP2 gives the single-process gradients whether lm_head shares the root unit or is
    sharded on its own (gathered only inside its own call, and again for its backward)."""
    pytest.importorskip("transformers")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    spawn_ranks(_fsdp_worker, str(tmp_path / "init"))


def _fsdp1_worker(rank, world):
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    base, ids, mask, labels, ref, mine = hf_setup(rank)
    for patch_first, use_orig_params in [(True, True), (False, False)]:
        model = copy.deepcopy(base)
        if patch_first:
            patch_global(model)
        layers, head = set(model.model.layers), model.lm_head
        # lm_head is its own unit: its flat parameter is gathered only inside its call.
        policy = functools.partial(
            lambda_auto_wrap_policy, lambda_fn=lambda m, layers=layers, head=head: m in layers or m is head
        )
        fsdp = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        if not patch_first:
            patch_global(fsdp)  # unwraps FSDP; the probe runs through it
        fsdp(input_ids=ids[mine], attention_mask=mask[mine], labels=labels[mine]).loss.backward()
        # Read the gradients back as one SGD step of size 1 on the gathered parameters
        # (FSDP1 cannot gather gradients with use_orig_params=False).
        torch.optim.SGD(fsdp.parameters(), lr=1.0).step()
        with FSDP.summon_full_params(fsdp):
            pairs = zip(fsdp.module.named_parameters(), base.parameters(), ref.parameters(), strict=True)
            for (name, p), p0, q in pairs:
                torch.testing.assert_close(
                    p0 - p, q.grad, rtol=1e-4, atol=1e-6, msg=f"patched {'before' if patch_first else 'after'}: {name}"
                )


def test_fsdp1_with_its_own_lm_head_unit(tmp_path):
    """FSDP1 (FullyShardedDataParallel) with lm_head wrapped on its own, patched before or
    after wrapping, gives the single-process gradients."""
    pytest.importorskip("transformers")
    spawn_ranks(_fsdp1_worker, str(tmp_path / "init"))
