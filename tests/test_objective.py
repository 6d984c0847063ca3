"""Chapter 01: the Pareto frontier, the operating point and the reward-weighted loss."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from recbook.objective import (LOSS_VARIANTS, choose_operating_point, pareto_front, plot_pareto, results_to_points,
                               reward_weighted_loss, reward_weighted_loss_grad, weighted_objective)

points = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=40)


def dominates(a, b):
    return a[0] <= b[0] and a[1] <= b[1] and a != b


@given(points)
def test_front_is_exactly_the_non_dominated_points(pts):
    t, e = [p[0] for p in pts], [p[1] for p in pts]
    front = pareto_front(t, e)
    front_pts = {pts[i] for i in front}
    assert len(front_pts) == len(front)  # duplicates kept once
    for p in pts:
        dominated = any(dominates(q, p) for q in pts)
        assert (p in front_pts) == (not dominated)
    assert list(np.asarray(t)[front]) == sorted(np.asarray(t)[front])


@given(points, st.floats(0.001, 100))
def test_front_contains_every_minimum_of_the_weighted_objective(pts, lam):
    t, e = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    j = weighted_objective(t, e, lam)
    front_pts = {pts[i] for i in pareto_front(t, e)}
    for i in np.flatnonzero(np.isclose(j, j.min())):
        assert pts[i] in front_pts


@given(points, st.integers(0, 50))
def test_budget_choice_is_the_best_feasible(pts, budget):
    t, e = [p[0] for p in pts], [p[1] for p in pts]
    assume(min(t) <= budget)
    i = choose_operating_point(t, e, budget=budget)
    assert t[i] <= budget
    assert e[i] == min(ei for ti, ei in zip(t, e) if ti <= budget)


def test_operating_point_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        choose_operating_point([1], [0.1])
    with pytest.raises(ValueError, match="No variant meets"):
        choose_operating_point([5, 6], [0.1, 0.2], budget=1)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        weighted_objective([1], [1], -1)
    with pytest.raises(ValueError, match="finite"):
        pareto_front([1, float("nan")], [0.1, 0.2])


def test_non_convex_front_point_reachable_by_budget_only():
    t, e = [10, 20, 30], [0.5, 0.42, 0.2]
    assert choose_operating_point(t, e, budget=25) == 1
    assert 1 not in {choose_operating_point(t, e, lam=lam) for lam in np.linspace(0, 1, 2001)}


def test_plot_pareto_draws_all_points(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    ax = plot_pareto(["a", "b", "c"], [1, 2, 3], [0.3, 0.4, 0.1], budget=2.5, chosen=0)
    offsets = sum(len(c.get_offsets()) for c in ax.collections)
    assert offsets == 3 + 1  # every point, plus the ring around the chosen one
    ax.figure.savefig(tmp_path / "p.png")


def test_results_to_points_requires_latency_and_metric():
    from recbook.core import BenchResult
    with pytest.raises(ValueError, match="without a latency"):
        results_to_points([BenchResult("x", {"ndcg@10": 0.3})], "ndcg@10")


scores_and_rewards = st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-20, 20), min_size=n, max_size=n), st.lists(st.floats(0, 5), min_size=n, max_size=n)))


@given(scores_and_rewards, st.sampled_from(LOSS_VARIANTS))
def test_closed_form_gradient_matches_autograd(data, variant):
    y = torch.tensor(data[0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor(data[1], dtype=torch.float64)
    (auto,) = torch.autograd.grad(reward_weighted_loss(y, r, variant), y)
    torch.testing.assert_close(auto, reward_weighted_loss_grad(y.detach(), r, variant), atol=1e-12, rtol=1e-9)


@given(scores_and_rewards, st.sampled_from(LOSS_VARIANTS))
def test_zero_rewards_give_zero_loss_and_gradient(data, variant):
    y = torch.tensor(data[0], dtype=torch.float64, requires_grad=True)
    loss = reward_weighted_loss(y, torch.zeros_like(y), variant)
    (grad,) = torch.autograd.grad(loss, y)
    assert loss.item() == 0 and torch.all(grad == 0)


@given(scores_and_rewards, st.sampled_from(LOSS_VARIANTS), st.floats(0.01, 100))
def test_scaling_rewards_scales_the_loss(data, variant, c):
    y, r = torch.tensor(data[0], dtype=torch.float64), torch.tensor(data[1], dtype=torch.float64)
    torch.testing.assert_close(reward_weighted_loss(y, c * r, variant), c * reward_weighted_loss(y, r, variant),
                               atol=1e-9, rtol=1e-9)


@given(scores_and_rewards, st.floats(-3, 3))
def test_sound_variants_ignore_a_shift_of_all_rewards(data, shift):
    y, r = torch.tensor(data[0], dtype=torch.float64), torch.tensor(data[1], dtype=torch.float64)
    for variant in ("bounded", "log_likelihood"):
        torch.testing.assert_close(reward_weighted_loss(y, r + shift, variant), reward_weighted_loss(y, r, variant),
                                   atol=1e-9, rtol=1e-9)


@given(scores_and_rewards)
def test_naive_loss_is_unbounded_and_sound_ones_are_bounded(data):
    y, r = torch.tensor(data[0], dtype=torch.float64), torch.tensor(data[1], dtype=torch.float64)
    assume(reward_weighted_loss(y, r, "naive").item() < -1e-6)
    assert reward_weighted_loss(1e6 * y, r, "naive") < -1
    bound = (r - r.mean()).abs().max().item()
    assert abs(reward_weighted_loss(1e6 * y, r, "bounded").item()) <= bound + 1e-9
    assert reward_weighted_loss(1e6 * y, r, "log_likelihood").item() >= 0


def test_loss_input_errors():
    y = torch.zeros(3)
    with pytest.raises(ValueError, match="same shape"):
        reward_weighted_loss(y, torch.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        reward_weighted_loss(y, torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="empty"):
        reward_weighted_loss(torch.zeros(0), torch.zeros(0))


def test_chain_rule_gradient_matches_autograd_on_a_transformer():
    from transformers import BertConfig, BertModel
    from recbook.objective import chain_rule_gradient
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=16)).double()
    model = torch.nn.ModuleDict({"encoder": encoder, "head": torch.nn.Linear(16, 1).double()}).eval()
    score = lambda ids: model["head"](model["encoder"](input_ids=ids[None]).last_hidden_state[:, 0])
    inputs = [torch.randint(0, 50, (n,)) for n in (3, 6, 4)]
    rewards = torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64)
    for variant in LOSS_VARIANTS:
        model.zero_grad()
        reward_weighted_loss(torch.stack([score(x).reshape(()) for x in inputs]), rewards, variant).backward()
        for p, g in zip(model.parameters(), chain_rule_gradient(model, score, inputs, rewards, variant)):
            torch.testing.assert_close(torch.zeros_like(g) if p.grad is None else p.grad, g, atol=1e-10, rtol=1e-8)
