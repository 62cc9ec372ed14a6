"""Losses against known answers: zero at identical models, F.kl_div, masks, endpoints, Monte Carlo unbiasedness."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from continual_opd.stages.losses import (
    forward_kl_loss,
    full_reverse_kl_loss,
    gather_token_logprobs,
    generalized_jsd_loss,
    lm_loss,
    sampled_reverse_kl_loss,
)

B, T, V = 3, 5, 11


def _logits(seed: int, scale: float = 2.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask() -> torch.Tensor:
    """Right-padded responses of lengths 5, 3 and 0 (an empty row)."""
    return torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])


def _full_losses():
    """Every full-vocabulary estimator as f(student_logits, teacher_logits, mask) -> (loss, stats)."""
    return {
        "reverse": full_reverse_kl_loss,
        "forward": forward_kl_loss,
        "jsd_0.3": lambda s, t, m: generalized_jsd_loss(s, t, m, beta=0.3),
        "jsd_0": lambda s, t, m: generalized_jsd_loss(s, t, m, beta=0.0),
        "jsd_1": lambda s, t, m: generalized_jsd_loss(s, t, m, beta=1.0),
        "reverse_T2": lambda s, t, m: full_reverse_kl_loss(s, t, m, temperature=2.0),
    }


def _reference_kl(logp_a: torch.Tensor, logp_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per position with torch's own F.kl_div (input = log b, target = log a), mean over the mask."""
    per_pos = F.kl_div(logp_b, logp_a, reduction="none", log_target=True).sum(-1)
    return per_pos[mask.bool()].mean()


# --- identical models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_full_losses()))
def test_full_losses_zero_loss_and_gradient_for_identical_models(name):
    fn = _full_losses()[name]
    student = _logits(0).requires_grad_()
    loss, stats = fn(student, _logits(0), _mask())
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6
    assert stats["reverse_kl"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.9])
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_sampled_zero_loss_and_gradient_for_identical_models(gamma, normalize):
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    logits = _logits(0).requires_grad_()
    s = gather_token_logprobs(logits, tokens)
    q = gather_token_logprobs(_logits(0), tokens)
    loss, stats = sampled_reverse_kl_loss(s, q, _mask(), gamma=gamma, normalize=normalize)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad.abs().max().item() == 0.0
    assert stats["reverse_kl"].item() == 0.0


# --- exact values ---------------------------------------------------------------------------------------------------


def test_full_reverse_kl_matches_torch_kl_div():
    student, teacher, mask = _logits(0), _logits(1), _mask()
    loss, stats = full_reverse_kl_loss(student, teacher, mask)
    expected = _reference_kl(F.log_softmax(student, -1), F.log_softmax(teacher, -1), mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["reverse_kl"].item() == pytest.approx(expected.item(), rel=1e-5)
    forward = _reference_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1), mask)
    assert stats["forward_kl"].item() == pytest.approx(forward.item(), rel=1e-5)
    assert stats["num_tokens"].item() == 8


def test_full_reverse_kl_temperature_divides_logits():
    student, teacher, mask = _logits(0), _logits(1), _mask()
    loss, _ = full_reverse_kl_loss(student, teacher, mask, temperature=2.0)
    expected, _ = full_reverse_kl_loss(student / 2.0, teacher / 2.0, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_forward_kl_matches_torch_kl_div_and_entropy():
    student, teacher, mask = _logits(0), _logits(1), _mask()
    loss, stats = forward_kl_loss(student, teacher, mask)
    expected = _reference_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1), mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    entropy = torch.distributions.Categorical(logits=student[mask.bool()]).entropy().mean()
    assert stats["student_entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)


def test_full_gradient_flows_to_student_only():
    student, teacher = _logits(0).requires_grad_(), _logits(1).requires_grad_()
    for fn in _full_losses().values():
        fn(student, teacher, _mask())[0].backward()
    assert teacher.grad is None or teacher.grad.abs().max().item() == 0.0
    assert student.grad.abs().max().item() > 0


# --- masks ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(_full_losses()))
def test_full_losses_ignore_masked_positions(name):
    fn = _full_losses()[name]
    mask = _mask()
    s1, t1 = _logits(0).requires_grad_(), _logits(1)
    loss1, stats1 = fn(s1, t1, mask)
    loss1.backward()
    # change (wildly) every masked position of both models, including inf and nan
    s2, t2 = _logits(0).detach().clone(), _logits(1).clone()
    off = ~mask.bool()
    s2[off] = _logits(7)[off] * 100
    t2[off] = float("nan")
    s2[2, 0, 3] = float("inf")
    s2.requires_grad_()
    loss2, stats2 = fn(s2, t2, mask)
    loss2.backward()
    assert loss2.item() == loss1.item()
    assert torch.equal(s1.grad, s2.grad)
    assert s2.grad[off].abs().max().item() == 0.0
    assert stats1["reverse_kl"].item() == stats2["reverse_kl"].item()


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_sampled_ignores_masked_positions(gamma):
    mask = _mask()
    off = ~mask.bool()
    g = torch.Generator().manual_seed(3)
    s1 = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    q = -torch.rand(B, T, generator=g) * 3
    loss1, _ = sampled_reverse_kl_loss(s1, q, mask, gamma=gamma)
    loss1.backward()
    s2 = s1.detach().clone()
    s2[off] = -float("inf")
    s2.requires_grad_()
    q2 = q.clone()
    q2[off] = float("nan")
    loss2, _ = sampled_reverse_kl_loss(s2, q2, mask, gamma=gamma)
    loss2.backward()
    assert loss2.item() == loss1.item()
    assert torch.equal(s1.grad, s2.grad)


def test_all_masked_gives_zero_loss_with_gradient_path():
    empty = torch.zeros(B, T)
    student = _logits(0).requires_grad_()
    for fn in _full_losses().values():
        loss, stats = fn(student, _logits(1), empty)
        loss.backward()
        assert loss.item() == 0.0 and stats["num_tokens"].item() == 0
    s = torch.zeros(B, T, requires_grad=True)
    for normalize in ("token", "sequence"):
        loss, stats = sampled_reverse_kl_loss(s, torch.zeros(B, T), empty, normalize=normalize)
        loss.backward()
        assert loss.item() == 0.0 and stats["num_tokens"].item() == 0
    labels = torch.full((B, T), -100)
    loss, stats = lm_loss(student, labels)
    loss.backward()
    assert loss.item() == 0.0 and stats["num_tokens"].item() == 0


def test_banned_tokens_with_minus_inf_logits_stay_finite():
    student, teacher = _logits(0), _logits(1)
    student[..., 4] = -float("inf")
    teacher[..., 4] = -float("inf")
    student.requires_grad_()
    for fn in _full_losses().values():
        loss, _ = fn(student, teacher, _mask())
        loss.backward()
        assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


# --- generalized JSD --------------------------------------------------------------------------------------------------


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher, mask = _logits(0), _logits(1), _mask()
    forward = _reference_kl(F.log_softmax(teacher, -1), F.log_softmax(student, -1), mask)
    reverse = _reference_kl(F.log_softmax(student, -1), F.log_softmax(teacher, -1), mask)
    assert generalized_jsd_loss(student, teacher, mask, 0.0)[0].item() == pytest.approx(forward.item(), rel=1e-5)
    assert generalized_jsd_loss(student, teacher, mask, 1.0)[0].item() == pytest.approx(reverse.item(), rel=1e-5)
    assert forward_kl_loss(student, teacher, mask)[0].item() == pytest.approx(forward.item(), rel=1e-5)


@pytest.mark.parametrize(
    "dtype, eps, rel, grad_rel",
    # the deviation is O(eps) (about 14 eps here); in fp32 rounding adds to it, more so in the gradient
    [(torch.float64, 1e-6, 1e-4, 1e-4), (torch.float32, 1e-4, 3e-3, 2e-2)],
)
def test_generalized_jsd_is_continuous_at_both_endpoints(dtype, eps, rel, grad_rel):
    student, teacher, mask = _logits(0, dtype=dtype), _logits(1, dtype=dtype), _mask()
    at0 = generalized_jsd_loss(student, teacher, mask, 0.0)[0].item()
    at1 = generalized_jsd_loss(student, teacher, mask, 1.0)[0].item()
    assert generalized_jsd_loss(student, teacher, mask, eps)[0].item() == pytest.approx(at0, rel=rel)
    assert generalized_jsd_loss(student, teacher, mask, 1 - eps)[0].item() == pytest.approx(at1, rel=rel)
    # and the gradient too: the scaled JSD's gradient tends to the endpoint KL's gradient
    grads = []
    for beta in (0.0, eps, 1 - eps, 1.0):
        s = student.clone().requires_grad_()
        generalized_jsd_loss(s, teacher, mask, beta)[0].backward()
        grads.append(s.grad)
    assert (grads[1] - grads[0]).norm() <= grad_rel * grads[0].norm()
    assert (grads[2] - grads[3]).norm() <= grad_rel * grads[3].norm()


def test_generalized_jsd_half_is_four_times_standard_jsd():
    student, teacher, mask = _logits(0), _logits(1), _mask()
    logp_s, logp_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    logm = torch.logsumexp(torch.stack([logp_s, logp_t]), 0) - torch.log(torch.tensor(2.0))
    jsd = 0.5 * _reference_kl(logp_t, logm, mask) + 0.5 * _reference_kl(logp_s, logm, mask)
    loss, stats = generalized_jsd_loss(student, teacher, mask, 0.5)
    assert stats["jsd"].item() == pytest.approx(jsd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(4 * jsd.item(), rel=1e-5)


def test_generalized_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(_logits(0), _logits(1), _mask(), 1.5)


# --- sampled-token reverse KL -----------------------------------------------------------------------------------------


def test_sampled_loss_value_is_sampled_kl_and_ratio_is_one_on_policy():
    mask = _mask()
    g = torch.Generator().manual_seed(4)
    s = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    q = -torch.rand(B, T, generator=g) * 3
    loss, stats = sampled_reverse_kl_loss(s, q, mask)
    on = mask.bool()
    expected = (s.detach() - q)[on].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["reverse_kl"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["student_entropy"].item() == pytest.approx(-s.detach()[on].mean().item(), rel=1e-6)
    # passing the on-policy sampler log-probs explicitly changes nothing, gradient included
    loss.backward()
    grad_default = s.grad.clone()
    s.grad = None
    loss2, _ = sampled_reverse_kl_loss(s, q, mask, sampler_logprobs_BL=s.detach().clone())
    loss2.backward()
    assert loss2.item() == loss.item()
    assert torch.equal(s.grad, grad_default)
    # gradient = A * grad s / N with A = -(s - q): the policy-gradient form
    assert torch.allclose(grad_default, torch.where(on, (s.detach() - q) / on.sum(), 0.0))


def test_sampled_importance_ratio_off_policy():
    mask = torch.ones(1, 3)
    s = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    q = torch.tensor([[-1.5, -1.0, -0.5]])
    sampler = torch.tensor([[-1.2, -2.0, -0.1]])
    loss, stats = sampled_reverse_kl_loss(s, q, mask, sampler_logprobs_BL=sampler)
    loss.backward()
    ratio = torch.exp(s.detach() - sampler)
    advantage = q - s.detach()
    assert loss.item() == pytest.approx((-(ratio * advantage)).mean().item(), rel=1e-6)
    assert torch.allclose(s.grad, -(ratio * advantage) / 3)
    assert stats["ratio_max"].item() == pytest.approx(ratio.max().item())


def test_sampled_discounting_matches_hand_computation():
    s = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.4, -9.0, -9.0]], requires_grad=True)
    q = torch.tensor([[-2.0, -1.0, -1.5, -1.0], [-0.7, -0.1, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    gamma = 0.5
    # rewards r = q - s: row 0 = [-1, 1, -1, 2], row 1 = [-0.5, 0.3, (masked), (masked)]
    # A_t = r_t + 0.5 r_{t+1} + 0.25 r_{t+2} + 0.125 r_{t+3}
    a0 = [-1 + 0.5 * 1 + 0.25 * -1 + 0.125 * 2, 1 + 0.5 * -1 + 0.25 * 2, -1 + 0.5 * 2, 2.0]
    a1 = [-0.5 + 0.5 * 0.3, 0.3, 0.0, 0.0]
    advantage = torch.tensor([a0, a1])
    loss, stats = sampled_reverse_kl_loss(s, q, mask, gamma=gamma)
    loss.backward()
    n = 6
    assert loss.item() == pytest.approx(-(advantage * mask).sum().item() / n, rel=1e-6)
    assert torch.allclose(s.grad, -advantage * mask / n)
    assert stats["advantage"].item() == pytest.approx(advantage[mask.bool()].mean().item(), rel=1e-6)
    # per-sequence normalization: each row's tokens share the row's weight 1/2
    s.grad = None
    loss_seq, _ = sampled_reverse_kl_loss(s, q, mask, gamma=gamma, normalize="sequence")
    loss_seq.backward()
    weights = torch.tensor([[1 / 4] * 4, [1 / 2] * 4]) / 2
    assert loss_seq.item() == pytest.approx(-(advantage * mask * weights).sum().item(), rel=1e-6)
    assert torch.allclose(s.grad, -advantage * mask * weights)


def test_sampled_gradient_is_unbiased_for_one_categorical():
    """E[grad loss] = grad KL(p_s || p_t) for one token: Monte Carlo with many samples."""
    torch.manual_seed(0)
    theta = torch.tensor([0.5, -1.0, 1.5, 0.0, -0.3], requires_grad=True)
    teacher_logp = F.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.3, 0.0]), -1)
    logp = F.log_softmax(theta, -1)
    exact = (logp.exp() * (logp - teacher_logp)).sum()
    (grad_exact,) = torch.autograd.grad(exact, theta)

    n = 400_000
    x = torch.multinomial(logp.detach().exp(), n, replacement=True)
    s = F.log_softmax(theta, -1)[x].view(1, n)  # one sequence of n on-policy tokens, gamma = 0
    loss, stats = sampled_reverse_kl_loss(s, teacher_logp[x].view(1, n), torch.ones(1, n))
    (grad_mc,) = torch.autograd.grad(loss, theta)
    assert torch.allclose(grad_mc, grad_exact, atol=6e-3), (grad_mc, grad_exact)
    assert stats["reverse_kl"].item() == pytest.approx(exact.item(), abs=5e-3)


def test_sampled_gradient_with_gamma_one_is_unbiased_for_sequence_kl():
    """Two-token sequences from tabular policies: gamma=1 gives the exact gradient of the sequence-level KL."""
    torch.manual_seed(0)
    theta1 = torch.tensor([0.3, -0.5, 0.8], requires_grad=True)  # p_s(x1)
    theta2 = torch.tensor([[0.5, 0.0, -1.0], [1.0, -0.2, 0.1], [-0.4, 0.9, 0.0]], requires_grad=True)  # p_s(x2|x1)
    t1 = F.log_softmax(torch.tensor([0.0, 0.7, -0.3]), -1)
    t2 = F.log_softmax(torch.tensor([[0.2, -0.6, 0.4], [0.0, 0.0, 1.0], [0.5, 0.5, -1.0]]), -1)
    l1, l2 = F.log_softmax(theta1, -1), F.log_softmax(theta2, -1)
    # KL over whole sequences: sum_{x1} p(x1) [log p(x1)/q(x1) + sum_{x2} p(x2|x1) log p(x2|x1)/q(x2|x1)]
    exact = (l1.exp() * ((l1 - t1) + (l2.exp() * (l2 - t2)).sum(-1))).sum()
    (g1_exact, g2_exact) = torch.autograd.grad(exact, (theta1, theta2), retain_graph=True)

    n = 300_000
    x1 = torch.multinomial(l1.detach().exp(), n, replacement=True)
    x2 = torch.multinomial(l2.detach().exp()[x1], 1).squeeze(-1)
    s = torch.stack([l1[x1], l2[x1, x2]], dim=1)  # (n, 2)
    q = torch.stack([t1[x1], t2[x1, x2]], dim=1)
    loss, _ = sampled_reverse_kl_loss(s, q, torch.ones(n, 2), gamma=1.0)
    # token normalization divides by 2n; the sequence KL is a sum over the 2 tokens
    (g1_mc, g2_mc) = torch.autograd.grad(2 * loss, (theta1, theta2), retain_graph=True)
    assert torch.allclose(g1_mc, g1_exact, atol=8e-3), (g1_mc, g1_exact)  # MC error here is ~2e-3
    assert torch.allclose(g2_mc, g2_exact, atol=8e-3), (g2_mc, g2_exact)
    # gamma = 0 drops the second token's KL from the first token's credit: not the sequence-KL gradient
    loss0, _ = sampled_reverse_kl_loss(s, q, torch.ones(n, 2), gamma=0.0)
    (g1_greedy,) = torch.autograd.grad(2 * loss0, theta1)
    assert (g1_greedy - g1_exact).abs().max().item() > 1.5e-2


def test_sampled_rejects_bad_arguments():
    s = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="gamma"):
        sampled_reverse_kl_loss(s, s, torch.ones(1, 2), gamma=1.5)
    with pytest.raises(ValueError, match="normalize"):
        sampled_reverse_kl_loss(s, s, torch.ones(1, 2), normalize="batch")


# --- helpers, precision, lm loss ------------------------------------------------------------------------------------


def test_gather_token_logprobs_matches_log_softmax():
    logits = _logits(0)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    expected = F.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(gather_token_logprobs(logits, tokens, temperature=0.7), expected, atol=1e-6)


def test_bf16_inputs_are_upcast_to_fp32():
    student, teacher, mask = _logits(0, dtype=torch.bfloat16), _logits(1, dtype=torch.bfloat16), _mask()
    for fn in _full_losses().values():
        loss, stats = fn(student, teacher, mask)
        loss32, _ = fn(student.float(), teacher.float(), mask)
        assert loss.dtype == torch.float32 and stats["reverse_kl"].dtype == torch.float32
        assert loss.item() == pytest.approx(loss32.item(), rel=1e-6)
    tokens = torch.zeros(B, T, dtype=torch.long)
    s, q = gather_token_logprobs(student, tokens), gather_token_logprobs(teacher, tokens)
    assert s.dtype == torch.float32
    loss, _ = sampled_reverse_kl_loss(s.bfloat16(), q.bfloat16(), mask)
    assert loss.dtype == torch.float32


def test_lm_loss_matches_shifted_cross_entropy():
    logits = _logits(0).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    labels[0, :2] = -100  # prompt
    labels[1, 4] = -100  # padding
    loss, stats = lm_loss(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["num_tokens"].item() == (labels[:, 1:] != -100).sum().item()
    loss.backward()
    assert logits.grad[:, -1].abs().max().item() == 0.0  # the last position predicts nothing


# --- cross-checks against TRL 1.16 (skipped when its internals move) -----------------------------------------------


def _trl_gkd_jsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_gkd_generalized_jsd(beta):
    trl_jsd = _trl_gkd_jsd()
    student, teacher, mask = _logits(0), _logits(1), _mask()
    labels = torch.where(mask.bool(), 0, -100)
    expected = trl_jsd(student, teacher, labels=labels, beta=beta).item()
    loss, stats = generalized_jsd_loss(student, teacher, mask, beta)
    assert stats["jsd"].item() == pytest.approx(expected, rel=1e-5)
    if beta == 1.0:  # TRL's beta=1 is exactly our reverse KL(student || teacher)
        assert full_reverse_kl_loss(student, teacher, mask)[0].item() == pytest.approx(expected, rel=1e-5)


def test_trl_gkd_jsd_jumps_at_endpoints_and_ours_does_not():
    trl_jsd = _trl_gkd_jsd()
    student, teacher, mask = _logits(0), _logits(1), _mask()
    labels = torch.where(mask.bool(), 0, -100)
    trl_at_1 = trl_jsd(student, teacher, labels=labels, beta=1.0).item()
    trl_near_1 = trl_jsd(student, teacher, labels=labels, beta=1 - 1e-4).item()
    assert trl_near_1 < 1e-2 * trl_at_1  # TRL: ~0 just below beta=1, the full reverse KL at 1
    ours_near_1 = generalized_jsd_loss(student, teacher, mask, 1 - 1e-4)[0].item()
    assert ours_near_1 == pytest.approx(trl_at_1, rel=3e-3)  # O(1 - beta) away from the endpoint


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_matches_trl_chunked_divergence_kernel(beta):
    """DistillationTrainer's loss works on hidden states + lm_head; project them ourselves and compare."""
    kernel = pytest.importorskip("trl.kernels.chunked_divergence")
    g = torch.Generator().manual_seed(6)
    H = 8
    h_s, h_t = torch.randn(10, H, generator=g), torch.randn(10, H, generator=g)
    w_s, w_t = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    w_s.requires_grad_()
    divergence, entropy = kernel.ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, beta)
    divergence.mean().backward()
    logits_s = (h_s @ w_s.detach().T).view(1, 10, V).requires_grad_()
    logits_t = (h_t @ w_t.T).view(1, 10, V)
    loss, stats = generalized_jsd_loss(logits_s, logits_t, torch.ones(1, 10), beta)
    assert loss.item() == pytest.approx(divergence.mean().item(), rel=1e-5)
    assert stats["student_entropy"].item() == pytest.approx(entropy.mean().item(), rel=1e-5)
    loss.backward()
    grad_w = logits_s.grad.view(10, V).T @ h_s  # chain rule through the projection
    assert torch.allclose(grad_w, w_s.grad, atol=1e-5)
