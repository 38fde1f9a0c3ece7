"""The fused operator: per-token cross-entropy terms of ``hidden @ weight.T`` without logits.

- ``dispatch``: which implementation and backward strategy run, and the calls into the op;
- ``registration``: the op registered with ``torch.library`` (one opaque node for
  ``torch.compile``), its fake implementations and its autograd formula;
- ``torch_path``: the chunked PyTorch implementation (CPU, fp64, no Triton);
- ``triton_path``: the Triton implementation, on ``hardfocus_fused.kernels``;
- ``forward_gradients``: the three-product path (gradients formed in the forward);
- ``loss_terms``: the cross-entropy variants from per-token statistics.
"""
