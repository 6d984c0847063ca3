"Chapter 05b: the query side (breakdown, asymmetric and static query encoders)."
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import tiny_bert
from recbook.model import BiEncoder
from recbook.queryside import (StaticQueryEncoder, cascade_target, load_query_encoder, ndcg_ratio_interval,
                               query_encoder_cascades, query_student,
                               query_time_breakdown, save_query_encoder, static_from_teacher, token_vectors,
                               train_query_side)

WORDS = ["red", "dress", "fits", "small", "cozy", "sweater", "long", "skirt", "love", "this", "top", "jeans"]


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return BiEncoder(tiny_bert(tokenizer, hidden=32, layers=2), tokenizer).eval()


@pytest.fixture(scope="module")
def static(teacher):
    return static_from_teacher(teacher, WORDS)


def test_token_vectors_are_the_teachers_one_token_texts(teacher):
    ids = teacher.tokenizer.convert_tokens_to_ids(WORDS[:4])
    vectors = token_vectors(teacher, ids)
    torch.testing.assert_close(vectors[ids], teacher.encode(WORDS[:4], max_length=8), atol=1e-5, rtol=1e-5)
    others = torch.ones(len(vectors), dtype=torch.bool)
    others[ids] = False
    assert vectors[others].abs().sum() == 0  # tokens not asked for start at zero


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join), min_size=1, max_size=12))
def test_static_query_is_the_same_alone_and_batched(static, queries):
    batched = static.encode(queries)
    assert torch.equal(batched, torch.cat([static.encode([q]) for q in queries]))
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(queries)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_static_query_is_the_mean_of_its_token_vectors(static, words, rng):
    shuffled = words[:]
    rng.shuffle(shuffled)
    ids = static.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    expected = F.normalize(static.vectors.weight[ids].mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(static.encode([" ".join(words)]), expected)
    torch.testing.assert_close(static.encode([" ".join(shuffled)]), expected)  # a bag of words


def test_static_encoder_needs_a_vector_per_token(tokenizer):
    with pytest.raises(ValueError, match="one vector per token"):
        StaticQueryEncoder(tokenizer, torch.zeros(10, 8))


def test_static_encoder_round_trips_and_refuses_foreign_folders(tmp_path, static):
    path = save_query_encoder(static, tmp_path / "static")
    assert torch.equal(load_query_encoder(path).encode(WORDS), static.encode(WORDS))
    save_query_encoder(static, path)  # its own folder may be replaced
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a recbook model folder"):
        save_query_encoder(static, user)
    assert (user / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="not a static query encoder"):
        load_query_encoder(user)


def _toy_problem(teacher, n_items=8, per_item=6, seed=0):
    "Items whose documents are the teacher's embeddings of one word; queries mention that word among others."
    rng = np.random.default_rng(seed)
    names = WORDS[:n_items]
    doc_emb = teacher.encode(names, max_length=8)
    queries, positives = [], []
    for i, name in enumerate(names):
        for _ in range(per_item):
            filler = rng.choice(WORDS[n_items:], size=2).tolist()
            queries.append(" ".join([*filler[:1], name, *filler[1:]]))
            positives.append(i)
    return queries, np.array(positives), doc_emb


@pytest.mark.parametrize("kind", ["static", "transformer"])
def test_query_side_training_lands_queries_on_their_items(teacher, kind):
    queries, positives, doc_emb = _toy_problem(teacher)
    student = static_from_teacher(teacher, WORDS) if kind == "static" else query_student(teacher, 1)
    if kind == "static":
        torch.nn.init.normal_(student.vectors.weight)  # start from noise: training must do the work
    hits = lambda: float(((student.encode(queries) @ doc_emb.T).argmax(1).numpy() == positives).mean())
    before = hits()
    teacher_query = teacher.encode(queries, max_length=32)
    losses = train_query_side(student, teacher_query, doc_emb, queries, positives, epochs=30, batch_size=16,
                              lr=5e-2 if kind == "static" else 1e-3, alpha=0.0, progress=False)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert hits() > max(before, 0.9)


def test_query_side_training_checks_its_inputs(teacher, static):
    doc_emb = teacher.encode(WORDS[:3], max_length=8)
    with pytest.raises(ValueError, match="one row per query"):
        train_query_side(static, doc_emb[:2], doc_emb, ["red dress"], [0], progress=False)


def test_query_student_keeps_the_teachers_space(teacher):
    student = query_student(teacher, 2)  # all layers kept: the same function as the teacher
    torch.testing.assert_close(student.encode(WORDS), teacher.encode(WORDS))
    assert query_student(teacher, 1).encoder.config.num_hidden_layers == 1


@pytest.mark.parametrize("which", ["transformer", "static"])
def test_breakdown_times_every_stage(teacher, static, which):
    model = teacher if which == "transformer" else static
    table = query_time_breakdown(model, WORDS[:4], teacher.encode(WORDS, max_length=8), repeats=1)
    expected = (["tokenise", "embeddings", "layer 0", "layer 1", "overhead", "pool + normalise"] if which == "transformer"
                else ["tokenise", "look up + mean + normalise"])
    assert list(table.index) == [*expected, "score + top-k", "total"]
    assert (table["ms"].drop(["overhead"], errors="ignore") >= 0).all()  # overhead is a difference of clocks
    np.testing.assert_allclose(table["share"].drop("total").sum(), 1.0)


def test_ndcg_ratio_interval_brackets_the_ratio():
    rng = np.random.default_rng(0)
    teacher = torch.tensor(rng.uniform(0, 1, 300))
    student = teacher * 0.9
    low, high = ndcg_ratio_interval(student, teacher, resamples=500)
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)  # a constant ratio has no spread
    noisy = torch.tensor(np.clip(teacher.numpy() + rng.normal(0, 0.2, 300), 0, 1))
    low, high = ndcg_ratio_interval(noisy, teacher, resamples=500)
    assert low < float(noisy.mean() / teacher.mean()) < high


def test_bench_writes_the_table_and_the_target(tmp_path, monkeypatch):
    import pandas as pd
    from recbook import queryside
    table = pd.DataFrame({"ndcg@10": [0.5, 0.49, 0.4], "retained": [1.0, 0.98, 0.8], "retained_low": [1.0, 0.95, 0.7],
                          "retained_high": [1.0, 1.01, 0.9], "ms_p50": [10.0, 2.0, 0.5], "speedup": [1.0, 5.0, 20.0],
                          "documents by": ["the teacher, offline"] * 3},
                         index=pd.Index(["teacher", "asymmetric", "static"], name="query encoder"))
    cascades = _cascades([("static: retrieval only", "static", "none", 0, 1.2, 400.0),
                          ("static + int8 rerank k=5", "static", "int8", 5, 1.1, 60.0),
                          ("brute force (fp32 rerank all)", "none", "fp32", 365, 1.0, 1.0)])
    monkeypatch.setattr(queryside, "query_side_study", lambda quick, encoder, progress: (table, cascades, {"test_queries": 3}))
    payload = json.loads(queryside.bench(tmp_path, quick=True).read_text())
    assert [r["name"] for r in payload["results"]] == ["teacher", "asymmetric", "static"]
    assert payload["targets"] == {"min_retained": 0.97, "min_speedup": 10.0, "fastest_within_quality": "asymmetric",
                                  "speedup": 5.0, "retained": 0.98, "met": False}
    assert [r["path"] for r in payload["cascades"]] == list(cascades.index)
    assert payload["cascade_target"]["fastest_within_quality"] == "static + int8 rerank k=5"
    assert payload["cascade_target"]["met"] and payload["cascades"][-1]["ms_p95"] is None  # NaN as JSON null
    assert payload["test_queries"] == 3 and "machine" in payload


def _cascades(rows):
    import pandas as pd
    frame = pd.DataFrame(rows, columns=["path", "query encoder", "reranker", "depth", "retained", "speedup"]).set_index("path")
    return frame.assign(**{"ndcg@10": frame["retained"] * 0.4, "retained_low": frame["retained"] - 0.05, "ms_p95": float("nan")})


def test_cascade_target_is_the_fastest_reranking_path_within_quality():
    rows = [("static: retrieval only", "static", "none", 0, 1.3, 900.0),  # fastest and best, but not a cascade
            ("static + int8 rerank k=3", "static", "int8", 3, 0.95, 120.0),  # fast, but below 97%
            ("static + int8 rerank k=5", "static", "int8", 5, 0.98, 45.0),
            ("teacher + fp32 rerank k=5", "teacher", "fp32", 5, 1.0, 20.0),
            ("brute force (fp32 rerank all)", "none", "fp32", 365, 1.0, 1.0)]
    target = cascade_target(_cascades(rows))
    assert target["fastest_within_quality"] == "static + int8 rerank k=5" and target["speedup"] == 45.0
    assert not target["met"] and cascade_target(_cascades(rows), min_speedup=40)["met"]
    assert cascade_target(_cascades(rows), min_retained=1.5) == {"min_retained": 1.5, "min_speedup": 50.0,
                                                                 "fastest_within_quality": None, "met": False}


@pytest.fixture(scope="module")
def shop():
    from recbook.data import build_search_task, clothing_interactions
    return build_search_task(clothing_interactions())


def test_cascade_reranking_everything_is_brute_force_and_each_depth_reranks_its_head(teacher, static, tokenizer, shop):
    from recbook.model import CrossEncoderScorer
    from recbook.metrics import ndcg_at_k
    reranker = CrossEncoderScorer(tiny_bert(tokenizer, hidden=32, layers=1, seed=1), tokenizer, max_length=24).eval()
    n = len(shop.items)
    doc_emb = teacher.encode(shop.items["document"].tolist())
    sizes = dict(cascade_queries=5, depths=(3, n), cascade_latency_queries=2, cascade_repeats=1, brute_repeats=1, bootstrap=50)
    table, info = query_encoder_cascades({"teacher": teacher, "static": static}, reranker, shop, doc_emb, sizes, progress=False)
    assert info["cascade_queries"] == 5 and info["catalogue"] == n
    assert list(table.index) == [f"{e}{p}" for e in ("teacher", "static") for p in
                                 (": retrieval only", " + fp32 rerank k=3", " + int8 rerank k=3", f" + fp32 rerank k={n}",
                                  f" + int8 rerank k={n}")] + ["brute force (fp32 rerank all)"]
    brute = table.loc["brute force (fp32 rerank all)"]
    for e in ("teacher", "static"):  # reranking every item with the fp32 reranker is brute force, whatever retrieved
        assert table.loc[f"{e} + fp32 rerank k={n}", "ndcg@10"] == pytest.approx(brute["ndcg@10"], abs=1e-6)
    test_q = shop.split("test").sample(frac=1.0, random_state=0).head(5)
    relevance = type(shop)(shop.items, {**shop.queries, "test": test_q}, shop.item_features).relevance("test")
    queries = teacher.encode(test_q["query"].tolist(), max_length=teacher.query_max_length)
    alone = ndcg_at_k(queries @ doc_emb.T, relevance).mean()  # retrieval only ranks by the query encoder's scores
    assert table.loc["teacher: retrieval only", "ndcg@10"] == pytest.approx(float(alone), abs=1e-6)
    cascade = table[table["depth"].between(1, n - 1)]
    assert (cascade["predicted_ms"] > table.loc[[f"{e}: retrieval only" for e in cascade["query encoder"]], "ms_p50"].to_numpy()).all()
