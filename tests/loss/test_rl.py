"""Policy-gradient losses on the fused op (hardfocus_fused.rl) and the DFT rule, each against
the same formula on materialised fp64 logits: loss and gradients."""

import pytest
import torch

from hardfocus_fused import hardfocus_loss
from hardfocus_fused.rl import aggregate, grpo_loss, token_logprobs
from hardfocus_fused.weighting.rules import DFT

from helpers import device_for, grads_of, make_batch
from reference import reference_logprobs, rel_err

B, T, H, V = 4, 9, 16, 60


def _batch(device, seed=21):
    h, w, b, labels = make_batch(B, T, H, V, device=device, seed=seed)
    labels[:, :3] = -100  # the prompt is not scored
    gen = torch.Generator().manual_seed(seed)
    mask = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1) != -100
    noise = lambda: (0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).to(device)  # noqa: E731
    return h, w, b, labels, mask, noise


def _reference_loss(logp, old, adv, mask, eps_low, eps_high, loss_type, max_len, beta, ref, entropy, coef):
    """GRPO written out in fp64, independently of hardfocus_fused.rl."""
    adv = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = mask.double()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * m).sum() / m.sum()
    else:
        loss = (per_token * m).sum() / (per_token.shape[0] * max_len)
    return loss - coef * (entropy * m).sum() / m.sum()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_grpo_loss_matches_the_formula_on_logits(impl, loss_type, per_token_advantages, triton_device):
    device = device_for(impl, triton_device)
    h, w, b, labels, mask, noise = _batch(device)
    gen = torch.Generator().manual_seed(5)
    adv = torch.randn((B, T) if per_token_advantages else (B,), generator=gen, dtype=torch.float64).to(device)
    logp, entropy = token_logprobs(h, w, labels, bias=b, temperature=0.9, return_entropy=True, impl=impl)
    ref_logp, ref_entropy, _ = reference_logprobs(h, w, labels, b, 0.9)
    old = (ref_logp + noise()).detach()  # clipping is active on some tokens, both ways
    reference_policy = (ref_logp + noise()).detach()
    options = dict(
        epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=T, beta=0.04, entropy_coef=0.01
    )
    ours = grpo_loss(
        logp,
        adv.float(),
        mask,
        old_log_probs=old.float(),
        ref_log_probs=reference_policy.float(),
        entropy=entropy,
        **options,
    )
    want = _reference_loss(ref_logp, old, adv, mask, 0.2, 0.28, loss_type, T, 0.04, reference_policy, ref_entropy, 0.01)
    assert rel_err(ours.loss, want) <= 1e-5
    assert 0 < ours.clip_fraction < 1 and ours.kl > 0 and ours.entropy > 0
    for g, r in zip(grads_of(ours.loss, (h, w, b)), grads_of(want, (h, w, b))):
        assert rel_err(g, r) <= 1e-4


def test_on_policy_grpo_is_the_advantage_weighted_log_likelihood():
    """One update per generation (old = current, detached): the gradient is that of
    -A * log p, token-averaged per sequence."""
    h, w, b, labels, mask, _ = _batch("cpu", seed=22)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    loss = grpo_loss(token_logprobs(h, w, labels, bias=b, impl="torch")[0], adv, mask).loss
    logp, _ = token_logprobs(h, w, labels, bias=b, impl="torch")
    m = mask.float()
    direct = (-(adv[:, None] * logp * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    for g, r in zip(grads_of(loss, (h, w, b)), grads_of(direct, (h, w, b))):
        assert rel_err(g, r) <= 1e-6


def test_option_errors():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregate(logp, mask, "ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(logp, mask, "dr_grpo")
    with pytest.raises(ValueError, match="ref_log_probs"):
        grpo_loss(logp, torch.zeros(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="return_entropy=True"):
        grpo_loss(logp, torch.zeros(2), mask, entropy_coef=0.1)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dft_scales_each_token_by_its_detached_probability(impl, triton_device):
    """DFT (dynamic fine-tuning): the token mean over the batch of ``sg(p_t) * nll_t``."""
    device = device_for(impl, triton_device)
    h, w, b, labels = make_batch(B, T, H, V, device=device, seed=23)
    loss = hardfocus_loss(h, w, labels, bias=b, method=DFT(), impl=impl)
    logp, _, _ = reference_logprobs(h, w, labels, b)
    mask = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1) != -100
    want = -(logp.detach().exp() * logp * mask).sum() / mask.sum()
    assert rel_err(loss, want) <= 1e-5
    for g, r in zip(grads_of(loss, (h, w, b)), grads_of(want, (h, w, b))):
        assert rel_err(g, r) <= 1e-4


def test_the_docs_example_runs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "rl.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})
