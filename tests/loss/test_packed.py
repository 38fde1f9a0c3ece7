"""Packed rows (several documents per row): the weighting is per document."""

import pytest
import torch

from hardfocus_fused import hardfocus_loss

from helpers import TOLERANCES, grads_of, make_batch
from reference import reference_loss, rel_err

# Two packed rows: row 0 holds documents of 5, 4 and 3 tokens, row 1 of 7 and 5.
LENGTHS = [[5, 4, 3], [7, 5]]


def packed_position_ids(lengths, seq):
    rows = [torch.cat([torch.arange(n) for n in row]) for row in lengths]
    assert all(r.numel() == seq for r in rows)
    return torch.stack(rows)


def unpack(tensor, lengths):
    """Documents as separate rows, right-padded to the longest (labels padded with -100)."""
    docs = []
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            docs.append(tensor[b, start : start + n])
            start += n
    longest = max(d.shape[0] for d in docs)
    pad_value = -100 if tensor.dtype == torch.int64 else 0.0
    return torch.stack([torch.cat([d, d.new_full((longest - d.shape[0], *d.shape[1:]), pad_value)]) for d in docs])


@pytest.mark.parametrize("method", ["irdro", "midranking", "mean"])
def test_weights_are_per_document(method):
    h, w, b, labels = make_batch(2, 12, 8, 30, seed=9, ragged=False, dead=False, scale=1.0)
    labels[0, 5] = -100  # a document start labelled -100, as DataCollatorWithFlattening does
    position_ids = packed_position_ids(LENGTHS, 12)
    loss, stats = hardfocus_loss(
        h, w, labels, bias=b, method=method, position_ids=position_ids, impl="torch", return_stats=True
    )
    # Reference: each document as its own row, so no document sees the next one's tokens.
    ref, ref_seq, ref_w, ref_n = reference_loss(unpack(h, LENGTHS), w, unpack(labels, LENGTHS), bias=b, method=method)
    assert stats.weights.shape == (5,)
    assert stats.n_tokens.tolist() == ref_n.tolist() == [4, 3, 2, 6, 4]
    assert rel_err(stats.seq_loss, ref_seq) <= 1e-5 and rel_err(stats.weights, ref_w) <= 1e-6
    assert rel_err(loss, ref) <= 1e-5
    for g, r in zip(grads_of(loss, (h, w, b)), grads_of(ref, (h, w, b))):
        assert rel_err(g, r) <= TOLERANCES[torch.float32][1]


def test_rows_without_resets_are_plain_rows():
    h, w, b, labels = make_batch(3, 9, 8, 30, seed=10)
    positions = torch.arange(9).expand(3, 9)
    plain = hardfocus_loss(h, w, labels, bias=b, impl="torch")
    packed = hardfocus_loss(h, w, labels, bias=b, impl="torch", position_ids=positions)
    torch.testing.assert_close(packed, plain, rtol=1e-6, atol=1e-6)


def test_position_ids_must_match_labels():
    h, w, b, labels = make_batch(2, 6, 8, 30)
    with pytest.raises(ValueError, match="position_ids"):
        hardfocus_loss(h, w, labels, position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids"):
        hardfocus_loss(h, w, labels, position_ids=torch.zeros(2, 6))
