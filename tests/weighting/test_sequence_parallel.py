"""sequence_group=: every rank holds a part of every sequence (context parallelism, labels
shifted before the split).  On 2 and 4 gloo ranks, alone and with data parallelism (2 x 2),
the loss, the per-sequence losses, the weights and the gradients of a DDP-wrapped model equal
the single-process fp64 reference on the unsplit batch (logits materialised); what cannot be
split is refused in one line."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hardfocus_fused import hardfocus_loss

from helpers import LossHead
from ranks import spawn_ranks
from reference import reference_loss

B, T, H_IN, H, V = 4, 8, 6, 8, 23
METHOD_OPTIONS = dict(n1=0.25, n2=0.5, r=0.7)


def batch():
    """Inputs and targets already shifted (``targets[:, t]`` is the label of position t + 1),
    ragged: sequence 1 has no target in the second half of the time axis, so some ranks hold
    none of its tokens."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H_IN, generator=gen) * 3
    labels = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    targets[0, :2] = -100
    targets[1, T // 2 :] = -100
    return x, targets


def reference(method):
    """fp64: loss, per-sequence losses, weights, and the gradients of every parameter."""
    x, targets = batch()
    model = LossHead(H_IN, H, V, shift=False).double()
    loss, seq_loss, weights, _ = reference_loss(
        model.proj(x.double()), model.head.weight, targets, method=method, shift=False, **METHOD_OPTIONS
    )
    loss.backward()
    return loss.detach(), seq_loss.detach(), weights, [p.grad for p in model.parameters()]


def _worker(rank, world, method, impl, data_parallel):
    """Ranks ``(dp, cp)``: ``dp`` picks the sequences (half the batch each with data
    parallelism), ``cp`` the part of the time axis."""
    n_dp = 2 if data_parallel else 1
    n_cp = world // n_dp
    dp, cp = divmod(rank, n_cp)
    # Every rank creates every group, in the same order (torch.distributed's rule).
    cp_groups = [dist.new_group([d * n_cp + c for c in range(n_cp)]) for d in range(n_dp)]
    dp_groups = [dist.new_group([d * n_cp + c for d in range(n_dp)]) for c in range(n_cp)]
    rows = slice(dp * B // n_dp, (dp + 1) * B // n_dp)
    steps = slice(cp * T // n_cp, (cp + 1) * T // n_cp)

    x, targets = batch()
    # DDP averages the gradients over all ranks.
    model = nn.parallel.DistributedDataParallel(LossHead(H_IN, H, V, shift=False))
    loss, stats = model(
        x[rows, steps],
        targets[rows, steps],
        method=method,
        impl=impl,
        sequence_group=cp_groups[dp],
        group=dp_groups[cp] if data_parallel else None,
        **METHOD_OPTIONS,
    )
    loss.backward()

    want_loss, want_seq, want_weights, want_grads = reference(method)
    torch.testing.assert_close(stats.seq_loss.double(), want_seq[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.weights.double(), want_weights[rows], rtol=1e-5, atol=1e-6)
    total = loss.detach().double()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, want_loss, rtol=1e-5, atol=1e-6)  # the mean over the ranks
    for (name, p), want in zip(model.module.named_parameters(), want_grads, strict=True):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["irdro", "midranking", "mean"])
@pytest.mark.parametrize("world", [2, 4])
def test_split_sequences_equal_the_unsplit_batch(method, world, tmp_path):
    spawn_ranks(_worker, str(tmp_path / "init"), method, "torch", False, world=world)


def test_split_sequences_on_the_triton_kernels(tmp_path):
    spawn_ranks(_worker, str(tmp_path / "init"), "irdro", "triton", False, world=2)


@pytest.mark.parametrize("method", ["irdro", "mean"])
def test_split_sequences_with_data_parallelism(method, tmp_path):
    spawn_ranks(_worker, str(tmp_path / "init"), method, "torch", True, world=4)


def _refusals(rank, world):
    x, targets = batch()
    hidden, weight = torch.randn(B, 4, H), torch.randn(V, H)
    group = dist.group.WORLD
    with pytest.raises(ValueError, match="shift=False"):
        hardfocus_loss(hidden, weight, targets[:, :4], impl="torch", sequence_group=group)
    with pytest.raises(ValueError, match="position_ids"):
        position_ids = torch.arange(4).repeat(B, 1)
        hardfocus_loss(
            hidden, weight, targets[:, :4], impl="torch", shift=False, sequence_group=group, position_ids=position_ids
        )
    rows = B - rank  # the ranks disagree on the batch
    with pytest.raises(ValueError, match="different batches"):
        hardfocus_loss(hidden[:rows], weight, targets[:rows, :4], impl="torch", shift=False, sequence_group=group)
    with pytest.raises(ValueError, match="backward_impl='forward'"):
        hardfocus_loss(
            hidden, weight, targets[:, :4], method="mean", backward_impl="forward", shift=False, sequence_group=group
        )


def test_what_cannot_be_split_is_refused(tmp_path):
    spawn_ranks(_refusals, str(tmp_path / "init"), world=2)


def test_a_patched_model_refuses_sequence_group():
    transformers = pytest.importorskip("transformers")
    from hardfocus_fused import apply_hardfocus

    from hf_models import tiny_model

    with pytest.raises(ValueError, match="sequence_group"):
        apply_hardfocus(tiny_model("llama"), sequence_group=object())
    assert transformers  # imported for the tiny model
