"Chapter 07a: distillation against autograd, batch-independent int8, what a server answers, and the operating point."
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from recbook.compress import RowwiseInt8Linear
from recbook.histories import build_recommendation_task, evaluate_recommendations
from recbook.index import VectorIndex
from recbook.recfast import (SequenceServer, distillation_loss, ease_candidates, evaluate_server, list_scores,
                             encoder_macs, fast_budgets, operating_point, quantize_recommender, served_lists)
from recbook.recommend import (PAD, SequenceRecommender, pad_sequences, fit_sequence_recommender, next_item_loss, sequence_scores,
                               training_windows, user_sequences)
from recbook.tables import DataError

TINY = dict(dim=8, layers=1, heads=1, max_length=6)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"user": np.repeat(np.arange(40), 6).astype(str), "item": rng.integers(0, 25, 240).astype(str),
                        "time": np.arange(240)})
    return build_recommendation_task(log, user="user", item="item", timestamp="time", min_interactions=3)


def windows_and_weights(seed):
    generator = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, 20, (4, 7), generator=generator)
    windows[0, :3] = PAD
    return windows, torch.ones(windows.shape)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 1000))
def test_distillation_loss_limits(seed):
    torch.manual_seed(seed)
    teacher, student = SequenceRecommender(20, **TINY).eval(), SequenceRecommender(20, **TINY).eval()
    windows, weights = windows_and_weights(seed)
    hard = next_item_loss(student, windows, weights)
    assert torch.allclose(distillation_loss(teacher, alpha=0.0)(student, windows, weights), hard, atol=1e-6)
    assert distillation_loss(student, alpha=1.0)(student, windows, weights).abs() < 1e-5  # KL(p || p) = 0
    assert distillation_loss(teacher, alpha=1.0)(student, windows, weights) > 0


def test_soft_gradient_is_temperature_times_probability_gap():
    torch.manual_seed(0)
    temperature, student, teacher = 3.0, torch.randn(6, 30, requires_grad=True), torch.randn(6, 30)
    soft = temperature ** 2 * F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1),
                                       reduction="batchmean")
    soft.backward()
    expected = temperature * (F.softmax(student / temperature, -1) - F.softmax(teacher / temperature, -1)) / 6
    assert torch.allclose(student.grad, expected.detach(), atol=1e-6)


def test_distillation_loss_rejects_bad_settings():
    teacher = SequenceRecommender(20, **TINY)
    for bad in ({"alpha": -0.1}, {"alpha": 1.5}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            distillation_loss(teacher, **bad)


def test_int8_recommender_is_batch_independent_and_close():
    torch.manual_seed(0)
    model = SequenceRecommender(30, **TINY).eval()
    quantized = quantize_recommender(model)
    assert sum(isinstance(m, RowwiseInt8Linear) for m in quantized.modules()) == 2
    sequences = torch.randint(0, 30, (6, 6))
    sequences[2, :3] = PAD
    with torch.inference_mode():
        batched = quantized.scores(sequences)
        alone = torch.cat([quantized.scores(sequences[i:i + 1]) for i in range(len(sequences))])
        assert torch.allclose(alone, batched, atol=1e-5)
        assert torch.allclose(batched, model.scores(sequences), atol=0.1)
    assert all(isinstance(m, torch.nn.Linear) and not isinstance(m, RowwiseInt8Linear)
               for layer in model.encoder.layers for m in (layer.linear1, layer.linear2))  # the original is untouched


def test_server_never_returns_seen_items_and_matches_batch_scoring(toy):
    model = SequenceRecommender(len(toy.items), **TINY).eval()
    served = served_lists(SequenceServer(model, k=5), toy)
    full = sequence_scores(model, toy, "test").masked_fill(~toy.candidate_mask("test"), float("-inf"))
    for history, found, scores in zip(user_sequences(toy, "test"), served, full):
        assert len(found) == 5 and not np.isin(found, history).any()
        assert torch.allclose(scores[found], torch.topk(scores, 5).values, atol=1e-5)


def test_exact_index_and_all_item_candidates_serve_the_same_lists(toy):
    model = SequenceRecommender(len(toy.items), **TINY).eval()
    server = SequenceServer(model, k=5)
    plain = [list(a) for a in served_lists(server, toy)]
    exact = SequenceServer(model, k=5, index=VectorIndex(server.items.numpy(), kind="flat"))
    everything = SequenceServer(model, k=5, candidates=ease_candidates(np.zeros((len(toy.items),) * 2), len(toy.items)))
    assert [list(a) for a in served_lists(exact, toy)] == plain
    assert [list(a) for a in served_lists(everything, toy)] == plain
    with pytest.raises(ValueError):
        SequenceServer(model, index=exact.index, candidates=everything.candidates)


def test_served_metrics_equal_the_full_score_metrics(toy):
    model = SequenceRecommender(len(toy.items), **TINY).eval()
    full = sequence_scores(model, toy, "test")
    reference = evaluate_recommendations(full, toy, "test")
    served = evaluate_server(SequenceServer(model, k=10), toy)
    for metric in ("hr@10", "ndcg@10"):
        assert served[metric] == pytest.approx(reference[metric], abs=1e-6)


def test_list_scores():
    scores = list_scores([np.array([3, 1]), np.array([], dtype=int)], 5)
    assert scores[0].tolist() == [float("-inf"), -1.0, float("-inf"), 0.0, float("-inf")]
    assert torch.isinf(scores[1]).all()


def test_operating_point_and_its_stability():
    # test NDCG@10 says the opposite of validation: the decision must follow validation only
    table = pd.DataFrame({"valid_ndcg@10": [0.10, 0.09, 0.05], "ndcg@10": [0.01, 0.02, 0.30], "ms_per_user": [1.0, 0.5, 0.2],
                          "ms_low": [0.9, 0.45, 0.18], "ms_high": [1.1, 0.62, 0.22]}, index=["big", "mid", "small"])
    assert operating_point(table, 0.6) == {"budget_ms": 0.6, "chosen": "mid", "stable": False,
                                           "picks": {"ms_per_user": "mid", "ms_low": "mid", "ms_high": "small"}}
    assert operating_point(table, 2.0)["chosen"] == "big" and operating_point(table, 2.0)["stable"]
    assert operating_point(table, 0.1)["chosen"] is None


def test_training_hooks(toy):
    users = toy.train["user_id"].drop_duplicates().iloc[:10].tolist()
    windows, _ = training_windows(toy, 6, users=users)
    everyone, _ = training_windows(toy, 6)
    assert 0 < len(windows) < len(everyone)
    with pytest.raises(DataError):
        training_windows(toy, 6, users=["nobody"])
    teacher = SequenceRecommender(len(toy.items), **TINY)
    seen = []
    def augment(batch, generator):
        seen.append(len(batch))
        return batch
    model, log = fit_sequence_recommender(toy, epochs=1, eval_every=1, users=users, augment=augment,
                                          loss=distillation_loss(teacher), **TINY)
    assert sum(seen) == len(windows) and len(log) == 1 and np.isfinite(log["loss"]).all()


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.sampled_from([4, 8, 16]), st.integers(2, 12))
def test_encoder_macs_match_torch_flop_counter(layers, dim, length):
    from torch.utils.flop_counter import FlopCounterMode
    model = SequenceRecommender(30, dim=dim, layers=layers, heads=1, max_length=length).train()  # unfused path
    with FlopCounterMode(display=False) as counter:
        model(pad_sequences([np.arange(length)], length), model.item_vectors().detach())
    assert counter.get_total_flops() == 2 * encoder_macs(model)


def test_fast_budgets():
    assert fast_budgets(2.0) == (0.5, 1.5, 5.0)
