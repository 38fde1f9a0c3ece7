"""Batch builders and the comparison used across the test modules."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hardfocus_fused import hardfocus_loss

from reference import reference_loss, rel_err

# The tolerances: loss relative error, gradient max-abs-error / max-abs-reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-3, 2e-2),
    torch.float16: (2e-3, 2e-2),
    torch.float64: (1e-5, 1e-4),  # the loss, weights and per-token coefficients are fp32
}


def device_for(impl: str, triton_device: str) -> str:
    """Tensors for ``impl="triton"`` live where the kernels run; the torch path uses the CPU."""
    return triton_device if impl == "triton" else "cpu"


def make_batch(
    batch=3,
    seq=11,
    hidden=40,
    vocab=100,
    *,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    bias=True,
    ragged=True,
    dead=True,
    scale=0.3,
):
    """Random (hidden, weight, bias, labels) with left/right padding and a fully ignored row."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * scale
    b = torch.randn(vocab, generator=gen) if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    if ragged and seq > 3:
        labels[0, : seq // 3] = -100  # left padding, as the paper's code pads
        if batch > 1:
            labels[1, -(seq // 4) :] = -100  # right padding
    if dead and batch > 2:
        labels[2] = -100  # a sequence with no target at all

    def leaf(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

    return leaf(h), leaf(w), leaf(b), labels.to(device)


def grads_of(loss, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, wanted, allow_unused=False)


def assert_matches_reference(hidden, weight, bias, labels, tolerances=None, **options):
    """Loss, stats and every gradient of ``hardfocus_loss`` against the fp64 reference
    (within ``tolerances``, (loss, gradient), or the dtype's)."""
    loss, stats = hardfocus_loss(hidden, weight, labels, bias=bias, return_stats=True, **options)
    ref_options = {k: v for k, v in options.items() if k not in ("impl", "deterministic", "validate", "backward_impl")}
    ref_loss, ref_seq, ref_w, ref_n = reference_loss(hidden, weight, labels, bias=bias, **ref_options)
    tol_loss, tol_grad = tolerances or TOLERANCES[hidden.dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, ref_loss) <= tol_loss, (loss.item(), ref_loss.item())
    assert torch.equal(stats.n_tokens.cpu(), ref_n.cpu())
    assert rel_err(stats.seq_loss, ref_seq) <= tol_loss
    assert rel_err(stats.weights, ref_w) <= max(tol_loss, 1e-6)
    torch.testing.assert_close((stats.weights * stats.seq_loss).sum(), loss.detach(), rtol=1e-6, atol=1e-6)
    tensors = (hidden, weight, bias)
    got = grads_of(loss, tensors)
    want = grads_of(ref_loss, tensors)
    names = [
        name
        for name, t in zip(("grad_hidden", "grad_weight", "grad_bias"), tensors)
        if t is not None and t.requires_grad
    ]
    scales = rounding_scales(hidden, weight, bias, labels, **ref_options)
    unit_roundoff = torch.finfo(hidden.dtype).eps / 2  # the largest relative error of rounding to nearest
    for name, g, r in zip(names, got, want):
        err = rel_err(g, r)
        # Besides the relative tolerance, the rounding a half-precision matmul operand
        # brings (the logit gradients go into the products in the inputs' dtype): the unit
        # roundoff times the sum of the products' magnitudes.  It matters where the products
        # cancel, as in a single token's hidden gradient (sum_v dz_v w_v with sum_v dz_v = 0).
        allowed = tol_grad + unit_roundoff * scales[name] / max(r.double().abs().max().item(), 1e-300)
        assert err <= allowed, f"{name}: rel err {err:.2e} > {tol_grad} (+ rounding {allowed - tol_grad:.1e})"
    return loss, stats


def rounding_scales(hidden, weight, bias, labels, **options) -> dict[str, float]:
    """For each gradient, the largest sum of the magnitudes of the products that form it, in
    fp64: ``|dZ| @ |W|`` (hidden), ``|dZ|^T @ |H|`` (weight), ``sum_t |dZ|`` (bias), with
    ``dZ`` the reference's gradient of the loss w.r.t. the (pre-soft-capping) logits.  ``dZ``
    comes from the reference itself: given the identity as hidden states and the logits as
    the weight, its weight gradient is ``dZ^T``."""
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    z = h @ weight.detach().double().T
    if bias is not None:
        z = z + bias.detach().double()
    n = h.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=h.device).reshape(*hidden.shape[:-1], n)
    logits = z.T.contiguous().requires_grad_()
    loss = reference_loss(eye, logits, labels, **options)[0]
    (dz_t,) = torch.autograd.grad(loss, logits)
    dz = dz_t.T.abs()
    return {
        "grad_hidden": (dz @ weight.detach().double().abs()).max().item(),
        "grad_weight": (dz.T @ h.abs()).max().item(),
        "grad_bias": dz.sum(0).max().item(),
    }


def assert_same_updates(before: dict, after: dict, expected_after: dict, rtol: float = 1e-3, context: str = "") -> None:
    """Training moved every parameter as the reference run did: the updates ``after -
    before`` agree to ``rtol`` of each tensor's largest reference update.  (Comparing the
    parameters themselves would hide a wrong gradient scale in updates far smaller than
    the weights.)"""
    for key, start in before.items():
        ours, ref = after[key] - start, expected_after[key] - start
        scale = ref.abs().max().item()
        assert scale > 0, f"{context}{key}: the reference run did not update it"
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * scale, msg=f"{context}{key}")


def state_of(model) -> dict:
    """A detached copy of ``model``'s state dict (parameters before or after training)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def spy_on_launches(monkeypatch, flags: tuple[str, ...]) -> list[dict]:
    """Record, for every launch of the forward and of the atomic backward kernel, the
    compile-time ``flags`` it was launched with (``kernels.problem.launch_flags``; the
    launches still run)."""
    from hardfocus_fused.kernels import backward_fused, forward
    from hardfocus_fused.kernels.problem import launch_flags

    seen: list[dict] = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched = launch_flags(args, kwargs)
                seen.append({k: launched[k] for k in flags if k in launched})
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(forward, "_lse_forward_kernel", Spy(forward._lse_forward_kernel))
    monkeypatch.setattr(backward_fused, "_lce_backward_kernel", Spy(backward_fused._lce_backward_kernel))
    return seen


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any torch op produces while active.

    Bytes, not elements: the interpreter moves kernel arguments as uint8 byte buffers."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


class LossHead(torch.nn.Module):
    """A projection and a bias-free head (seeded, so every rank builds the same) whose
    forward is ``hardfocus_loss`` with its stats: the model the multi-process tests wrap in
    DDP and compare with one process."""

    def __init__(self, n_in: int, n_hidden: int, n_vocab: int, **loss_options):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(n_in, n_hidden)
        self.head = torch.nn.Linear(n_hidden, n_vocab, bias=False)
        self.loss_options = loss_options

    def forward(self, x, labels, **options):
        from hardfocus_fused import hardfocus_loss

        options = {**self.loss_options, **options}
        return hardfocus_loss(self.proj(x), self.head.weight, labels, return_stats=True, **options)
