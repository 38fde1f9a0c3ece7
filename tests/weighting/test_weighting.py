"""The paper's weighting rules, on hand-checked examples."""

import math

import pytest
import torch

from hardfocus_fused import sequence_weights
from hardfocus_fused.weighting.methods import ranking_window

from reference import reference_weights

LOSSES = torch.tensor([0.5, 3.0, 1.0, 2.5, 0.1, 4.0, 2.0, 1.5])  # ranks: 5,1,3,6,7,0,4,2 -> see below
FULL = torch.full((8,), 10)


def kept(weights):
    return [i for i, w in enumerate(weights.tolist()) if w > 0]


def test_midranking_paper_setting():
    # B=8, n1=n2=0.25: skip the 2 largest (4.0 @5, 3.0 @1), keep the next 2 (2.5 @3, 2.0 @6).
    w = sequence_weights(LOSSES, FULL, method="midranking", n1=0.25, n2=0.25)
    assert kept(w) == [3, 6] and w[3].item() == 0.5 and w.sum().item() == 1.0


def test_high_low_uniform():
    assert kept(sequence_weights(LOSSES, FULL, method="highranking", n2=0.25)) == [1, 5]
    assert kept(sequence_weights(LOSSES, FULL, method="lowranking", n2=0.25)) == [0, 4]
    w = sequence_weights(LOSSES, FULL, method="uniform")
    assert torch.allclose(w, torch.full((8,), 0.125))


def test_sequences_without_targets_take_no_part():
    n = FULL.clone()
    n[5] = 0  # the largest loss, but no target tokens
    n[1] = 0
    w = sequence_weights(LOSSES, n, method="midranking", n1=0.25, n2=0.25)
    # 6 live: floor(1.5)=1 skipped (2.5 @3), keep 1 (2.0 @6).
    assert kept(w) == [6]
    w = sequence_weights(LOSSES, n, method="irdro", r=1.0)
    assert w[5] == 0 and w[1] == 0 and math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)


def test_ties_are_broken_by_position():
    loss = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert kept(sequence_weights(loss, torch.ones(4), method="highranking", n2=0.5)) == [0, 1]
    assert kept(sequence_weights(loss, torch.ones(4), method="lowranking", n2=0.5)) == [2, 3]


@pytest.mark.parametrize(
    "n_live,n1,n2,expected",
    [
        (8, 0.25, 0.25, (2, 4)),
        (3, 0.25, 0.25, (0, 1)),  # floor(0.75)=0 skipped, max(1, 0) kept
        (4, 0.75, 0.5, (2, 4)),  # asks for ranks 3..5 of 4: window slides up to keep 2
        (4, 1.0, 0.0, (3, 4)),
        (5, 0.0, 1.0, (0, 5)),  # n1=0, n2=1 is Uniform
        (0, 0.25, 0.25, (0, 0)),
    ],
)
def test_ranking_window(n_live, n1, n2, expected):
    assert ranking_window(n_live, "midranking", n1, n2) == expected


def test_irdro_is_softmax_and_limits():
    w = sequence_weights(LOSSES, FULL, method="irdro", r=10.0)
    torch.testing.assert_close(w, torch.softmax(LOSSES / 10.0, 0))
    one_hot = sequence_weights(LOSSES, FULL, method="irdro", r=1e-3)
    assert kept(one_hot) == [5] and one_hot[5].item() == 1.0
    flat = sequence_weights(LOSSES, FULL, method="irdro", r=1e6)
    torch.testing.assert_close(flat, torch.full((8,), 0.125), rtol=1e-5, atol=0)


def test_mean_weights_reproduce_token_mean():
    n = torch.tensor([3, 0, 5, 2])
    loss = torch.tensor([1.0, 0.0, 2.0, 4.0])
    w = sequence_weights(loss, n, method="mean", seq_reduction="mean")
    torch.testing.assert_close(w, torch.tensor([0.3, 0.0, 0.5, 0.2]))
    w = sequence_weights(loss, n, method="mean", seq_reduction="sum")
    torch.testing.assert_close(w, torch.tensor([0.1, 0.0, 0.1, 0.1]))


@pytest.mark.parametrize("method", ["irdro", "midranking", "highranking", "lowranking", "uniform", "mean"])
def test_matches_reference_rule_on_random_batches(method):
    gen = torch.Generator().manual_seed(0)
    for batch in range(1, 12):
        loss = torch.rand(batch, generator=gen) * 5
        n = torch.randint(0, 4, (batch,), generator=gen)
        w = sequence_weights(loss, n, method=method, r=0.5, n1=0.3, n2=0.4)
        want = reference_weights(loss.tolist(), n.tolist(), method, 0.5, 0.3, 0.4, "mean")
        torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-7)
