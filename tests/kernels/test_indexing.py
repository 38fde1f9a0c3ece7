"""Index arithmetic past 2**31 elements, checked without allocating such tensors.

Every kernel addresses ``hidden``, ``weight`` and the gradient buffers as
``row_index * row_stride + column``, with row indices from ``tiles.token_block`` and
``tiles.vocab_block``.  A (tokens x H) or (V x H) tensor, or an N x V index space, can pass
2**31 elements; these helpers must hand out int64 indices so the products do not wrap.
This kernel runs exactly those helpers on indices near 2**31 (in the interpreter on CPU,
where int32 arithmetic wraps just as it does on a GPU) and checks the offsets.
"""

import torch
import triton
import triton.language as tl

from hardfocus_fused.kernels.tiles import token_block, vocab_block

BLOCK = 16


@triton.jit
def _row_offsets_kernel(
    order_ptr, n_active_ptr, token_out_ptr, vocab_out_ptr, v0, n_vocab, row_stride, BLOCK: tl.constexpr
):
    n_active = tl.load(n_active_ptr)
    tok, row_mask = token_block(order_ptr, n_active, 0, BLOCK)
    tl.store(token_out_ptr + tl.arange(0, BLOCK), tok * row_stride + 7, mask=row_mask)
    cols, col_mask = vocab_block(v0, n_vocab, BLOCK)
    tl.store(vocab_out_ptr + tl.arange(0, BLOCK), cols * row_stride + 7, mask=col_mask)


def test_row_offsets_do_not_wrap(triton_device):
    stride = 4096  # a Llama-3-8B hidden size
    first = (2**31 // stride) - 4  # rows whose offsets cross 2**31
    order = torch.arange(first, first + BLOCK, dtype=torch.int32, device=triton_device)
    n_active = torch.tensor([BLOCK - 3], dtype=torch.int32, device=triton_device)
    token_out = torch.full((BLOCK,), -1, dtype=torch.int64, device=triton_device)
    vocab_out = torch.full((BLOCK,), -1, dtype=torch.int64, device=triton_device)
    n_vocab = first + BLOCK - 2
    _row_offsets_kernel[(1,)](order, n_active, token_out, vocab_out, first, n_vocab, stride, BLOCK=BLOCK)

    rows = torch.arange(first, first + BLOCK, dtype=torch.int64)
    want = rows * stride + 7
    assert want.max() > 2**31
    assert torch.equal(token_out.cpu()[: BLOCK - 3], want[: BLOCK - 3])
    assert (token_out.cpu()[BLOCK - 3 :] == -1).all()  # masked slots are not written
    assert torch.equal(vocab_out.cpu()[: BLOCK - 2], want[: BLOCK - 2])
    assert (vocab_out.cpu()[BLOCK - 2 :] == -1).all()
