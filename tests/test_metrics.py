"""Chapter 02a: ranking and scoring metrics, against scikit-learn, SciPy and a brute-force average over tie orders."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import ndcg_score, roc_auc_score

from recbook.metrics import (average_ranks, macro_average, ndcg_at_k, ranking_report, recall_at_k, reciprocal_rank,
                             roc_auc, spearman)

fast = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, max_queries=3, max_candidates=6, top_score=3, masked=True):
    "Integer scores from a small range (many ties), grades 0..3 and optionally a padding mask."
    q, n = draw(st.integers(1, max_queries)), draw(st.integers(1, max_candidates))
    grid = lambda elements: st.lists(st.lists(elements, min_size=n, max_size=n), min_size=q, max_size=q)
    scores = np.array(draw(grid(st.integers(0, top_score))), dtype=float)
    grades = np.array(draw(grid(st.integers(0, 3))))
    mask = np.array(draw(grid(st.booleans()))) if masked else np.ones((q, n), dtype=bool)
    return torch.tensor(scores), torch.tensor(grades), torch.tensor(mask)


def gain_of(grade, gain):
    return 2**grade - 1 if gain == "exponential" else grade


def tie_order_average(scores, grades, valid, k, gain, min_relevance):
    "NDCG@k, reciprocal rank and recall@k of one query, averaged over every order of the tied candidates."
    items = [i for i in range(len(scores)) if valid[i]]
    ideal = sorted((gain_of(grades[i], gain) for i in items), reverse=True)
    idcg = sum(x / math.log2(p + 2) for p, x in enumerate(ideal[:k]))
    relevant = {i for i in items if grades[i] >= min_relevance}
    ndcg = rr = recall = 0.0
    orders = list(itertools.permutations(range(len(items))))
    for keys in orders:
        tiebreak = dict(zip(items, keys))
        ranking = sorted(items, key=lambda i: (-scores[i], tiebreak[i]))
        dcg = sum(gain_of(grades[i], gain) / math.log2(p + 2) for p, i in enumerate(ranking[:k]))
        ndcg += dcg / idcg if idcg > 0 else 0.0
        rr += next((1 / (p + 1) for p, i in enumerate(ranking) if i in relevant), 0.0)
        recall += len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0
    return ndcg / len(orders), rr / len(orders), recall / len(orders)


def all_metrics(scores, grades, mask=None, k=3, min_relevance=2, gain="exponential"):
    return (ndcg_at_k(scores, grades, k=k, gain=gain, mask=mask),
            reciprocal_rank(scores, grades, min_relevance=min_relevance, mask=mask),
            recall_at_k(scores, grades, k=k, min_relevance=min_relevance, mask=mask))


# --- against references ---------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(batches(), st.integers(1, 8), st.sampled_from(["exponential", "linear"]), st.integers(1, 3))
def test_ranking_metrics_are_the_average_over_tie_orders(batch, k, gain, min_relevance):
    scores, grades, mask = batch
    got = all_metrics(scores, grades, mask, k=k, min_relevance=min_relevance, gain=gain)
    for q in range(scores.shape[0]):
        want = tie_order_average(scores[q].tolist(), grades[q].tolist(), mask[q].tolist(), k, gain, min_relevance)
        for metric, value in zip(got, want):
            assert metric[q].item() == pytest.approx(value, abs=1e-9)


@fast
@given(batches(max_queries=4, max_candidates=40, top_score=4, masked=False), st.integers(1, 50),
       st.sampled_from(["exponential", "linear"]), st.booleans())
def test_ndcg_matches_sklearn(batch, k, gain, continuous):
    scores, grades, _ = batch
    assume(scores.shape[1] > 1)  # sklearn refuses a single candidate
    if continuous:
        scores = scores + torch.rand(scores.shape, dtype=torch.float64)
    gains = gain_of(grades.double(), gain).numpy()
    want = [ndcg_score(g[None], s[None], k=k) for g, s in zip(gains, scores.numpy())]
    np.testing.assert_allclose(ndcg_at_k(scores, grades, k=k, gain=gain).numpy(), want, atol=1e-12)


@fast
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=60))
def test_roc_auc_matches_sklearn(pairs):
    scores, labels = np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs])
    assume(0 < labels.sum() < len(labels))
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)).item() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # the same pairs as two rows of a batch, the second reversed
    batch = roc_auc(torch.tensor(np.stack([scores, scores[::-1].copy()])), torch.tensor(np.stack([labels, labels[::-1].copy()])))
    np.testing.assert_allclose(batch.numpy(), [roc_auc_score(labels, scores)] * 2, atol=1e-12)


@fast
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=50))
def test_spearman_and_average_ranks_match_scipy(pairs):
    x, y = np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)
    np.testing.assert_array_equal(average_ranks(torch.tensor(x)).numpy(), rankdata(x))
    rho = spearman(torch.tensor(x), torch.tensor(y)).item()
    if len(set(x)) == 1 or len(set(y)) == 1:
        assert math.isnan(rho)
    else:
        assert rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_average_ranks_work_along_the_last_dim():
    x = torch.tensor([[3, 1, 3, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(average_ranks(x).numpy(), np.stack([rankdata(r) for r in x.numpy()]))


# --- edge cases -----------------------------------------------------------------------------------------------

def test_no_relevant_item_gives_zero():
    scores = torch.rand(3, 5)
    grades = torch.tensor([[0] * 5, [1] * 5, [3] * 5])
    mask = torch.tensor([[True] * 5, [True] * 5, [False] * 5])  # last row: relevant items, all padding
    ndcg, rr, recall = all_metrics(scores, grades, mask)
    assert ndcg.tolist()[0::2] == [0.0, 0.0] and ndcg[1].item() > 0  # grade 1 counts as gain for NDCG
    assert rr.tolist() == [0.0, 0.0, 0.0] and recall.tolist() == [0.0, 0.0, 0.0]  # ... not as relevant (>= 2)


@pytest.mark.parametrize("position", [0, 2, 4])
def test_all_tied_gives_the_random_ranking_value(position):
    grades = torch.zeros(1, 5, dtype=torch.long)
    grades[0, position] = 3
    ndcg, rr, recall = all_metrics(torch.full((1, 5), 0.7), grades, k=2)
    assert rr.item() == pytest.approx(sum(1 / j for j in range(1, 6)) / 5, abs=1e-12)
    assert recall.item() == pytest.approx(2 / 5, abs=1e-12)
    assert ndcg.item() == pytest.approx((1 + 1 / math.log2(3)) / 5, abs=1e-12)


@given(st.integers(2, 30), st.data())
@settings(max_examples=20, deadline=None)
def test_constant_scorer_gets_no_credit_for_input_order(n, data):
    reports = []
    for position in (0, data.draw(st.integers(0, n - 1)), n - 1):
        grades = torch.zeros(1, n, dtype=torch.long)
        grades[0, position] = 3
        reports.append(ranking_report(torch.zeros(1, n), grades, k=1, recall_k=1))
    assert reports[0] == pytest.approx(reports[1]) and reports[0] == pytest.approx(reports[2])
    assert reports[0]["mrr"] < 1 and reports[0]["ndcg@1"] == pytest.approx(1 / n)


def test_k_larger_than_the_list():
    scores, grades = torch.tensor([[0.3, 0.9, 0.1, 0.5]]), torch.tensor([[2, 0, 3, 1]])
    assert ndcg_at_k(scores, grades, k=100).item() == pytest.approx(ndcg_at_k(scores, grades, k=4).item(), abs=1e-15)
    assert recall_at_k(scores, grades, k=100).item() == 1.0
    assert ndcg_at_k(scores, grades, k=100).item() < 1


@pytest.mark.parametrize("grade, ndcg, rr", [(0, 0.0, 0.0), (1, 1.0, 0.0), (3, 1.0, 1.0)])
def test_one_candidate(grade, ndcg, rr):
    got = all_metrics(torch.tensor([[0.2]]), torch.tensor([[grade]]), k=5)
    assert [m.item() for m in got] == [ndcg, rr, rr]


def test_nan_score_of_padding_is_ignored():
    scores = torch.tensor([[0.1, float("nan"), 0.5]])
    mask = torch.tensor([[True, False, True]])
    got = all_metrics(scores, torch.tensor([[3, 3, 0]]), mask)
    assert [m.item() for m in got] == pytest.approx([1 / math.log2(3), 0.5, 1.0])


# --- invariants -----------------------------------------------------------------------------------------------

@fast
@given(batches(max_candidates=12), st.integers(1, 12))
def test_strictly_increasing_transform_changes_nothing(batch, k):
    scores, grades, mask = batch
    transformed = torch.exp(scores / 3) * 5 - 2  # keeps the order and the ties
    for a, b in zip(all_metrics(scores, grades, mask, k=k), all_metrics(transformed, grades, mask, k=k)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    flat_s, flat_g = scores.flatten(), grades.flatten()
    if len(set(flat_s.tolist())) > 1 and len(set(flat_g.tolist())) > 1:
        torch.testing.assert_close(spearman(flat_s, flat_g), spearman(transformed.flatten(), flat_g ** 3))
    if 0 < (flat_g >= 2).sum() < len(flat_g):
        torch.testing.assert_close(roc_auc(flat_s, flat_g >= 2), roc_auc(transformed.flatten(), flat_g >= 2))


@fast
@given(batches(max_candidates=12), st.integers(1, 12), st.integers(1, 3))
def test_perfect_scorer(batch, k, min_relevance):
    _, grades, mask = batch
    ndcg, rr, recall = all_metrics(grades.double(), grades, mask, k=k, min_relevance=min_relevance)
    has_gain = ((grades > 0) & mask).any(-1)
    n_relevant = ((grades >= min_relevance) & mask).sum(-1)
    torch.testing.assert_close(ndcg, has_gain.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close(rr, (n_relevant > 0).double(), rtol=0, atol=1e-12)
    n_relevant = n_relevant.double()
    want_recall = torch.where(n_relevant > 0, n_relevant.clamp(max=k) / n_relevant.clamp(min=1), 0)
    torch.testing.assert_close(recall, want_recall, rtol=0, atol=1e-12)


@fast
@given(batches(max_candidates=12), st.integers(1, 12), st.randoms(use_true_random=False))
def test_permuting_candidates_jointly_changes_nothing(batch, k, rnd):
    scores, grades, mask = batch
    perm = list(range(scores.shape[1]))
    rnd.shuffle(perm)
    for a, b in zip(all_metrics(scores, grades, mask, k=k), all_metrics(scores[:, perm], grades[:, perm], mask[:, perm], k=k)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@fast
@given(batches(max_candidates=8, masked=False), st.integers(1, 6), st.integers(1, 10))
def test_padding_is_never_ranked(batch, pad, k):
    scores, grades, _ = batch
    q = scores.shape[0]
    padded = (torch.cat([torch.full((q, pad), 99.0), scores], 1),  # padding outscores everything and is relevant
              torch.cat([torch.full((q, pad), 3), grades], 1),
              torch.cat([torch.zeros(q, pad, dtype=torch.bool), torch.ones_like(scores, dtype=torch.bool)], 1))
    for a, b in zip(all_metrics(scores, grades, k=k), all_metrics(*padded, k=k)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@fast
@given(batches(max_candidates=12), st.integers(1, 12))
def test_metrics_lie_in_the_unit_interval_and_grow_with_k(batch, k):
    scores, grades, mask = batch
    for small, large in zip(all_metrics(scores, grades, mask, k=k), all_metrics(scores, grades, mask, k=k + 1)):
        assert ((small >= 0) & (small <= 1 + 1e-12)).all()
    recall_k, recall_more = recall_at_k(scores, grades, k=k, mask=mask), recall_at_k(scores, grades, k=k + 1, mask=mask)
    assert (recall_more >= recall_k - 1e-12).all()


def test_integer_and_float_inputs_agree():
    g = torch.Generator().manual_seed(0)
    grades = torch.randint(0, 4, (5, 9), generator=g)
    scores = torch.randint(0, 3, (5, 9), generator=g)
    ints = all_metrics(scores, grades)
    for other in (all_metrics(scores.float(), grades.float()), all_metrics(scores.double(), grades.double())):
        for a, b in zip(ints, other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    scores, grades = torch.randint(0, 5, (64, 200), generator=g).float(), torch.randint(0, 4, (64, 200), generator=g)
    mask = torch.rand(64, 200, generator=g) > 0.1
    for a, b in zip(all_metrics(scores, grades, mask, k=10), all_metrics(scores.cuda(), grades.cuda(), mask.cuda(), k=10)):
        assert b.device.type == "cuda"
        torch.testing.assert_close(a, b.cpu())
    flat = scores.flatten(), grades.flatten()
    torch.testing.assert_close(spearman(*flat), spearman(flat[0].cuda(), flat[1].cuda()).cpu())
    torch.testing.assert_close(roc_auc(flat[0], flat[1] >= 2), roc_auc(flat[0].cuda(), flat[1].cuda() >= 2).cpu())


# --- averages and the report ----------------------------------------------------------------------------------

@fast
@given(st.lists(st.tuples(st.floats(0, 1), st.sampled_from(["a", "b", "c", "d"])), min_size=1, max_size=40))
def test_macro_average_is_the_mean_of_group_means(rows):
    values, groups = [r[0] for r in rows], [r[1] for r in rows]
    want = pd.DataFrame({"v": values, "g": groups}).groupby("g")["v"].mean().mean()
    assert macro_average(values, groups) == pytest.approx(want, abs=1e-12)
    codes = torch.tensor([ord(g) for g in groups])
    assert macro_average(torch.tensor(values, dtype=torch.float64), codes) == pytest.approx(want, abs=1e-12)


def test_ranking_report_keys_and_values():
    g = torch.Generator().manual_seed(1)
    scores, grades = torch.randint(0, 4, (12, 30), generator=g).double(), torch.randint(0, 4, (12, 30), generator=g)
    groups = [i % 5 for i in range(12)]
    report = ranking_report(scores, grades, groups=groups, k=5, recall_k=20)
    assert set(report) == {"ndcg@5", "mrr", "recall@20", "macro_ndcg@5", "macro_mrr", "macro_recall@20"}
    assert report["ndcg@5"] == pytest.approx(ndcg_at_k(scores, grades, k=5).mean().item())
    assert report["recall@20"] == pytest.approx(recall_at_k(scores, grades, k=20).mean().item())
    assert report["macro_mrr"] == pytest.approx(macro_average(reciprocal_rank(scores, grades), groups))
    assert set(ranking_report(scores, grades)) == {"ndcg@10", "mrr", "recall@100"}


# --- errors ---------------------------------------------------------------------------------------------------

nan = float("nan")
ok_scores, ok_grades = torch.rand(2, 3), torch.ones(2, 3)


@pytest.mark.parametrize("call, message", [
    (lambda: ndcg_at_k(torch.rand(2, 3), torch.rand(2, 4)), "shape"),
    (lambda: reciprocal_rank(torch.rand(3), torch.rand(3)), r"shape \[queries, candidates\]"),
    (lambda: recall_at_k(torch.rand(2, 0), torch.rand(2, 0)), "at least one candidate"),
    (lambda: ndcg_at_k(torch.tensor([[nan, 1.0]]), torch.ones(1, 2)), "NaN"),
    (lambda: recall_at_k(torch.tensor([[nan, 1.0]]), torch.ones(1, 2)), "NaN"),
    (lambda: reciprocal_rank(ok_scores, torch.full((2, 3), nan)), "relevance contains NaN"),
    (lambda: ndcg_at_k(ok_scores, ok_grades, k=0), "k must be"),
    (lambda: ndcg_at_k(ok_scores, ok_grades, k=2.5), "k must be"),
    (lambda: recall_at_k(ok_scores, ok_grades, k=-1), "k must be"),
    (lambda: ranking_report(ok_scores, ok_grades, recall_k=0), "recall_k must be"),
    (lambda: ndcg_at_k(ok_scores, -ok_grades), "relevance >= 0"),
    (lambda: ndcg_at_k(ok_scores, ok_grades, gain="cubic"), "gain must be one of"),
    (lambda: ndcg_at_k(ok_scores, ok_grades, mask=torch.ones(2, 3)), "mask must be a bool"),
    (lambda: ndcg_at_k(ok_scores, ok_grades, mask=torch.ones(2, 2, dtype=torch.bool)), "mask must be a bool"),
    (lambda: roc_auc(torch.rand(4), torch.ones(4)), "only one class"),
    (lambda: roc_auc(torch.rand(4, 3), torch.tensor([[0, 1, 0]] * 3 + [[1, 1, 1]])), "only one class"),
    (lambda: roc_auc(torch.rand(4), torch.tensor([0, 1, 2, 0])), "binary labels"),
    (lambda: roc_auc(torch.rand(4), torch.tensor([0, 1, 1])), "same shape"),
    (lambda: spearman(torch.rand(3), torch.rand(4)), "same shape"),
    (lambda: spearman(torch.rand(1), torch.rand(1)), "at least 2"),
    (lambda: average_ranks(torch.tensor([1.0, nan])), "NaN"),
    (lambda: macro_average([0.1, 0.2, 0.3], ["a", "b"]), "one group per value"),
    (lambda: macro_average([], []), "non-empty"),
])
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
