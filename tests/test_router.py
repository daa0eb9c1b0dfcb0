"""Router behaviour on hand-made logits: the router weight is the identity and x holds the logits."""

import math

import pytest
import torch

from moe.model.config import MoEConfig
from moe.model.router import Router, balancing_losses, routing_stats


def _router(n: int, **kw) -> Router:
    """Router over n experts of d_model n whose logits equal its input."""
    r = Router(n, MoEConfig(num_experts=n, **kw))
    with torch.no_grad():
        r.weight.copy_(torch.eye(n))
    return r


def _assignments(routing) -> dict[tuple[int, int], float]:
    """{(token, expert): gate} from a Routing's sorted arrays."""
    experts = torch.repeat_interleave(torch.arange(routing.counts_N.numel()), routing.counts_N)
    return {
        (int(t), int(e)): float(g)
        for t, e, g in zip(routing.token_A, experts, routing.gate_A.detach(), strict=True)
    }


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5], [0.2, 0.1, 0.4, 0.3]])


def test_softmax_before_topk_keeps_unnormalised_probabilities_of_top_k():
    routing = _router(4, top_k=2, order="before_topk")(LOGITS)
    probs = torch.softmax(LOGITS, -1)
    expected = {(t, e): float(probs[t, e]) for t in range(3) for e in probs[t].topk(2).indices.tolist()}
    got = _assignments(routing)
    assert got.keys() == expected.keys()
    for key, gate in expected.items():
        assert got[key] == pytest.approx(gate, rel=1e-6)
    assert sum(got[(0, e)] for e in (0, 1)) < 1


@pytest.mark.parametrize("order", ["before_topk_renorm", "after_topk"])
def test_softmax_renormalised_orders_give_softmax_over_kept_logits(order):
    got = _assignments(_router(4, top_k=2, order=order)(LOGITS))
    assert got[(0, 0)] == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)
    assert got[(0, 1)] == pytest.approx(1 / (1 + math.exp(1.0)), rel=1e-6)
    assert got[(1, 1)] + got[(1, 2)] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("order", ["before_topk", "before_topk_renorm", "after_topk"])
def test_sigmoid_gates_are_kept_sigmoid_scores_renormalised_unless_before_topk(order):
    got = _assignments(_router(4, top_k=2, score="sigmoid", order=order)(LOGITS))
    s0, s1 = torch.sigmoid(LOGITS[0, :2]).tolist()
    if order == "before_topk":
        assert (got[(0, 0)], got[(0, 1)]) == pytest.approx((s0, s1), rel=1e-6)
    else:
        assert (got[(0, 0)], got[(0, 1)]) == pytest.approx((s0 / (s0 + s1), s1 / (s0 + s1)), rel=1e-6)


def test_assignments_are_grouped_by_expert_in_token_order():
    torch.manual_seed(0)
    logits = torch.randn(50, 6)
    routing = _router(6, top_k=3)(logits)
    chosen = logits.topk(3, dim=-1).indices
    torch.testing.assert_close(routing.counts_N, torch.bincount(chosen.flatten(), minlength=6))
    start = 0
    for e, c in enumerate(routing.counts_N.tolist()):
        tokens = routing.token_A[start : start + c]
        start += c
        torch.testing.assert_close(tokens, (chosen == e).any(-1).nonzero().flatten())


def test_capacity_keeps_each_experts_first_tokens_and_reports_dropped_fraction():
    # 8 tokens, all prefer expert 0 then expert 1; k=1 over 4 experts -> capacity ceil(1.0*8/4)=2.
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0]]).repeat(8, 1)
    routing = _router(4, top_k=1, capacity_factor=1.0)(logits)
    assert routing.counts_N.tolist() == [2, 0, 0, 0]
    assert routing.token_A.tolist() == [0, 1]
    assert routing.routed_N.tolist() == [8, 0, 0, 0]
    stats = routing_stats(routing, *balancing_losses(routing), 1)
    assert stats["dropped_frac"].item() == pytest.approx(6 / 8)
    assert stats["empty_experts"].item() == 3
    # top-1 mass counts dropped tokens as 0
    assert stats["top1_mass"].item() == pytest.approx(2 / 8 * torch.softmax(logits[0], -1)[0].item())


def test_expert_choice_over_the_batch_experts_pick_their_highest_scoring_tokens():
    torch.manual_seed(0)
    logits = torch.randn(12, 4)
    # capacity = ceil(1.0 * 12 * 1 / 4) = 3 tokens per expert
    routing = _router(4, top_k=1, router="expert_choice", expert_choice_scope="batch")(logits)
    probs = torch.softmax(logits, -1)
    assert routing.counts_N.tolist() == [3, 3, 3, 3]
    for e in range(4):
        picked = routing.token_A[3 * e : 3 * e + 3]
        assert set(picked.tolist()) == set(probs[:, e].topk(3).indices.tolist())
        torch.testing.assert_close(routing.gate_A[3 * e : 3 * e + 3], probs[picked, e])
    unpicked = 12 - len(set(routing.token_A.tolist()))
    stats = routing_stats(routing, *balancing_losses(routing), 1)
    assert stats["dropped_frac"].item() == pytest.approx(unpicked / 12)
    best = torch.zeros(12)
    for t, g in zip(routing.token_A.tolist(), routing.gate_A.tolist(), strict=True):
        best[t] = max(best[t].item(), g)
    assert stats["top1_mass"].item() == pytest.approx(best.mean().item(), rel=1e-6)


def test_expert_choice_by_position_ranks_only_tokens_at_the_same_position():
    torch.manual_seed(0)
    B, S, N = 8, 3, 4
    logits = torch.randn(B * S, N)
    # capacity per position = ceil(1.0 * 8 * 1 / 4) = 2 of the 8 tokens at that position
    routing = _router(N, top_k=1, router="expert_choice")(logits, n_seq=B)
    probs_BSN = torch.softmax(logits, -1).view(B, S, N)
    assert routing.counts_N.tolist() == [S * 2] * N
    for e in range(N):
        picked = routing.token_A[e * S * 2 : (e + 1) * S * 2].tolist()
        for s in range(S):
            want = {b * S + s for b in probs_BSN[:, s, e].topk(2).indices.tolist()}
            assert {t for t in picked if t % S == s} == want


def test_aux_and_z_loss_equal_hand_computed_values():
    # Two tokens, two experts, top-1: token 0 -> expert 0, token 1 -> expert 0.
    logits = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    routing = _router(2, top_k=1)(logits)
    aux, z = balancing_losses(routing)
    p0 = (1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(-1))) / 2  # mean softmax prob of expert 0
    # f = (1, 0): aux = N * (f0 * P0 + f1 * P1) = 2 * P0
    assert aux.item() == pytest.approx(2 * p0, rel=1e-6)
    lse = [math.log(math.e + 1), math.log(math.e**2 + math.e)]
    assert z.item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    stats = routing_stats(routing, aux, z, 1)
    assert stats["imbalance"].item() == pytest.approx(2.0)
    p = torch.softmax(logits, -1)
    assert stats["entropy"].item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-6)


def test_balancing_losses_are_fp32_and_differentiable_for_bf16_input():
    r = _router(4, top_k=2).to(torch.bfloat16)
    x = LOGITS.to(torch.bfloat16).requires_grad_()
    aux, z = balancing_losses(r(x))
    assert aux.dtype == z.dtype == torch.float32
    (aux + z).backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_bias_balancing_moves_skewed_load_toward_uniform():
    torch.manual_seed(0)
    n = 8
    r = _router(n, top_k=2, bias_update_rate=0.005)
    logits = torch.randn(512, n) * 0.5 + torch.linspace(1.0, 0.0, n)  # experts 0,1 favoured
    first = routing_stats(routing := r(logits), *balancing_losses(routing), r.k_routed)["imbalance"].item()
    for _ in range(100):
        r.update_bias(r(logits).counts_N)
    last = routing_stats(routing := r(logits), *balancing_losses(routing), r.k_routed)["imbalance"].item()
    assert first > 2.0
    assert last < 1.3


def test_bias_changes_selection_but_not_gate_weights():
    r = _router(4, top_k=1, bias_update_rate=1.0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r.expert_bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))  # expert 1 now wins selection
    got = _assignments(r(logits))
    assert got == {(0, 1): pytest.approx(torch.softmax(logits, -1)[0, 1].item(), rel=1e-6)}


def test_update_bias_is_a_no_op_when_rate_is_zero():
    r = _router(4, top_k=1)
    r.update_bias(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    assert r.expert_bias.abs().sum().item() == 0


@pytest.mark.parametrize(
    ("kw", "gets_grad"),
    [
        (dict(top_k=1, order="before_topk"), True),
        (dict(top_k=2, order="before_topk_renorm"), True),
        (dict(top_k=2, order="after_topk"), True),
        (dict(top_k=2, order="after_topk", score="sigmoid"), True),
        (dict(top_k=1, order="after_topk", allow_no_router_grad=True), False),
        (dict(top_k=1, order="after_topk", score="sigmoid", allow_no_router_grad=True), False),
    ],
)
def test_router_gets_lm_gradient_except_after_topk_with_one_expert_per_token(kw, gets_grad):
    torch.manual_seed(0)
    r = Router(8, MoEConfig(num_experts=4, **kw))
    torch.nn.init.normal_(r.weight)
    routing = r(torch.randn(16, 8))
    # Any LM loss reaches the router only through the gates; weight them by something token-specific.
    loss = (routing.gate_A * torch.arange(1.0, routing.gate_A.numel() + 1)).sum()
    if loss.requires_grad:  # constant gates leave no graph to the router at all
        loss.backward()
    grad = r.weight.grad.abs().sum().item() if r.weight.grad is not None else 0.0
    assert (grad > 0) == gets_grad


def test_jitter_perturbs_routing_only_in_training():
    torch.manual_seed(0)
    r = _router(4, top_k=2, jitter=0.5)
    x = torch.randn(64, 4)
    r.eval()
    torch.testing.assert_close(r(x).gate_A, r(x).gate_A)
    r.train()
    assert not torch.equal(r(x).logits_TN, r(x).logits_TN)
