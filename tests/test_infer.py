"""Chapter 05: catalogue cache, batching, micro-batching, LRU cache, backends, reranker, service, cascade, cost model."""
import copy
import functools
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import tiny_bert
from recbook.infer import (LRUCache, MicroBatcher, PADDING_STRATEGIES, SearchService, SentenceTransformersPeer,
                           StaleCacheError, cascade_scores, catalogue_fingerprint, check_query, encode_catalogue,
                           encode_with_padding, encoder_backend, fit_cost_model, hard_negatives, listwise_loss, load_embeddings,
                           model_fingerprint, padding_batches, padding_waste, predict_latency, save_embeddings,
                           random_negatives, sub_catalogue, train_reranker, zipf_query_log, MAX_QUERY_CHARS)
from recbook.compress import quantize_int8
from recbook.model import BiEncoder, CrossEncoderScorer

DOCS = ["light summer dress with pockets", "warm wool sweater", "high-rise skinny jeans", "silk cami top",
        "denim jacket", "linen trousers for summer"]


@pytest.fixture()
def tiny(tokenizer):
    return BiEncoder(tiny_bert(tokenizer, hidden=32, layers=2, heads=2, ffn=64), tokenizer, doc_max_length=32)


@pytest.fixture()
def tiny_reranker(tokenizer):
    return CrossEncoderScorer(tiny_bert(tokenizer, hidden=32, layers=1, heads=2, ffn=64, seed=1), tokenizer, max_length=32).eval()


# --- LRU cache -------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(0, 5), keys=st.lists(st.integers(0, 8), max_size=60))
def test_lru_cache_behaves_like_functools(capacity, keys):
    reference = functools.lru_cache(maxsize=capacity)(lambda key: key * 10)
    cache = LRUCache(capacity)
    for key in keys:
        value = cache.get(key)
        if value is None:
            value = key * 10
            cache.put(key, value)
        assert value == reference(key)
    info = reference.cache_info()
    assert (cache.hits, cache.misses) == (info.hits, info.misses)
    assert len(cache) == info.currsize <= capacity


def test_lru_cache_rejects_negative_capacity():
    with pytest.raises(ValueError, match="capacity"):
        LRUCache(-1)


# --- micro-batching ---------------------------------------------------------------------------------------------

def test_micro_batcher_returns_each_caller_its_own_result_in_bounded_batches():
    seen = []
    def double(xs):
        seen.append(threading.get_ident())
        return [2 * x for x in xs]
    with MicroBatcher(double, max_batch=5, max_wait_ms=20) as batcher:
        with ThreadPoolExecutor(12) as pool:
            out = list(pool.map(batcher, range(60)))
    assert out == [2 * x for x in range(60)]
    assert sum(batcher.batch_sizes) == 60 and max(batcher.batch_sizes) <= 5 and max(batcher.batch_sizes) > 1
    assert len(set(seen)) == 1  # one worker thread runs the model


def test_micro_batcher_errors_reach_the_callers_and_the_worker_survives():
    with MicroBatcher(lambda xs: [10 // x for x in xs], max_wait_ms=0) as batcher:
        with pytest.raises(ZeroDivisionError):
            batcher(0)
        assert batcher(5) == 2
    with MicroBatcher(lambda xs: [1], max_batch=4, max_wait_ms=50) as batcher:
        futures = [batcher.submit(i) for i in range(3)]
        errors = [f.exception() for f in futures]
        assert any(isinstance(e, RuntimeError) and "outputs" in str(e) for e in errors)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(1)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda xs: xs, max_batch=0)


# --- padding ----------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=50), batch=st.integers(1, 16))
def test_padding_waste_orders_the_strategies(lengths, batch):
    fixed, dynamic, ordered = (padding_waste(lengths, batch, s, 128) for s in PADDING_STRATEGIES)
    assert 0 <= ordered <= dynamic + 1e-12 <= fixed + 2e-12 < 1
    covered = np.sort(np.concatenate([b for b, _ in padding_batches(lengths, batch, "sorted", 128)]))
    np.testing.assert_array_equal(covered, np.arange(len(lengths)))  # every text exactly once
    with pytest.raises(ValueError, match="padding strategy"):
        padding_batches(lengths, batch, "bucketed", 128)


@settings(max_examples=80, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=7), batch=st.integers(1, 4))
def test_length_sorted_batches_pad_least_of_any_split(lengths, batch):
    "Against brute force: every split of the texts into k-1 full batches and one short one, as input order has."
    k, r = -(-len(lengths) // batch), len(lengths) - (-(-len(lengths) // batch) - 1) * batch
    def padded(assignment):
        groups = [[lengths[i] for i, g in enumerate(assignment) if g == j] for j in range(k)]
        return sum(len(g) * max(g) for g in groups) if sorted(map(len, groups)) == [r] + [batch] * (k - 1) else float("inf")
    best = min(padded(a) for a in itertools.product(range(k), repeat=len(lengths)))
    batches = padding_batches(lengths, batch, "sorted", 128)
    assert sorted(len(b) for b, _ in batches) == [r] + [batch] * (k - 1)
    assert sum(len(b) * p for b, p in batches) == best


def test_padding_never_changes_the_embeddings(tiny):
    texts = ["dress", "a warm and very soft wool sweater for cold winter evenings", "jeans", "silk cami", "a top"]
    reference = tiny.encode(texts)
    for strategy in PADDING_STRATEGIES:
        torch.testing.assert_close(encode_with_padding(tiny, texts, strategy, batch_size=2), reference, atol=1e-5, rtol=1e-4)


# --- fingerprints and the catalogue cache -----------------------------------------------------------------------

def test_fingerprints_follow_weights_config_and_catalogue(tiny):
    assert model_fingerprint(tiny) == model_fingerprint(copy.deepcopy(tiny))
    edited = copy.deepcopy(tiny)
    with torch.no_grad():
        edited.encoder.encoder.layer[0].output.dense.bias[0] += 1e-6
    assert model_fingerprint(edited) != model_fingerprint(tiny)
    longer = copy.deepcopy(tiny); longer.doc_max_length = 64
    assert model_fingerprint(longer) != model_fingerprint(tiny)
    assert model_fingerprint(quantize_int8(tiny)) not in (model_fingerprint(tiny), None)
    base = catalogue_fingerprint([1, 2], ["a", "b"], 32)
    assert base != catalogue_fingerprint([1, 2], ["a", "c"], 32) != catalogue_fingerprint([1, 3], ["a", "b"], 32)
    assert base != catalogue_fingerprint([1, 2], ["a", "b"], 64)
    assert catalogue_fingerprint([1], ["ab"], 32) != catalogue_fingerprint([1], ["a", "b"], 32)


def test_catalogue_cache_is_reused_only_when_nothing_changed(tiny, tmp_path):
    ids = list(range(len(DOCS)))
    first, cached = encode_catalogue(tiny, ids, DOCS, cache=tmp_path)
    again, cached_again = encode_catalogue(tiny, ids, DOCS, cache=tmp_path)
    assert (cached, cached_again) == (False, True) and torch.equal(first, again)
    assert encode_catalogue(tiny, ids, DOCS[:-1] + ["new"], cache=tmp_path)[1] is False
    path = save_embeddings(tmp_path / "x.safetensors", first, "m1", "c1")
    torch.testing.assert_close(load_embeddings(path, "m1", "c1"), first)
    with pytest.raises(StaleCacheError, match="different model and catalogue"):
        load_embeddings(path, "m2", "c2")
    with pytest.raises(ValueError, match="differ in length"):
        encode_catalogue(tiny, ids[:2], DOCS)


# --- backends ----------------------------------------------------------------------------------------------------

def test_backends_embed_like_fp32(tiny, tmp_path):
    reference = tiny.encode(DOCS)
    peer = SentenceTransformersPeer(tiny, tmp_path)
    torch.testing.assert_close(peer.encode(DOCS, max_length=32), reference, atol=1e-4, rtol=1e-3)
    fused = encoder_backend(tiny, "onnx-fused-int8", tmp_path)
    assert ((fused.encode(DOCS) * reference).sum(1) > 0.8).all()
    assert len(model_fingerprint(fused)) == 16
    with pytest.raises(ValueError, match="Unknown backend"):
        encoder_backend(tiny, "tensorrt")


# --- queries, service, cascade ------------------------------------------------------------------------------------

def test_check_query_errors_and_truncation():
    with pytest.raises(TypeError, match="must be a string"):
        check_query(["dress"])
    with pytest.raises(TypeError, match="must be a string"):
        check_query(b"dress")
    for empty in ("", "   ", "\n\t"):
        with pytest.raises(ValueError, match="empty"):
            check_query(empty)
    assert check_query("  summer   dress ") == "summer dress"
    assert len(check_query("x" * 10 * MAX_QUERY_CHARS)) == MAX_QUERY_CHARS


@pytest.mark.parametrize("index", ["exact", "hnsw", "flat"])
def test_service_returns_k_items_reranked_then_retrieval_order(tiny, tiny_reranker, index):
    items = pd.DataFrame({"item_id": [f"sku{i}" for i in range(len(DOCS))], "document": DOCS})
    service = SearchService(tiny, items, reranker=tiny_reranker, index=index)
    result = service.search("summer dress", k=5, depth=3)
    assert len(result) == 5 and result["item_id"].is_unique
    assert result["rerank_score"].iloc[:3].is_monotonic_decreasing and result["rerank_score"].iloc[3:].isna().all()
    assert result["retrieval_score"].iloc[3:].is_monotonic_decreasing
    only = service.search("summer dress", k=6, depth=0)
    assert only["retrieval_score"].is_monotonic_decreasing and only["rerank_score"].isna().all()
    assert set(result["item_id"].iloc[:3]) == set(only["item_id"].iloc[:3])  # rerank reorders the retrieved head
    assert len(service.search("x " * 5000, k=2)) == 2
    with pytest.raises(ValueError, match="k >= 1"):
        service.search("dress", k=0)
    with pytest.raises(ValueError, match="empty"):
        service.search_batch(["dress", " "])
    with pytest.raises(TypeError):
        service.search(3.5)
    with pytest.raises(ValueError, match="item_id"):
        SearchService(tiny, items.rename(columns={"item_id": "sku"}))


def test_service_returns_columns_and_uses_given_embeddings(tiny):
    items = pd.DataFrame({"item_id": range(len(DOCS)), "document": DOCS, "colour": [f"c{i}" for i in range(len(DOCS))]})
    fresh = SearchService(tiny, items, index="exact", columns=["colour"])
    given = SearchService(tiny, items, index="exact", columns=["colour"], embeddings=fresh.embeddings.clone())
    result, again = fresh.search("summer dress", k=4), given.search("summer dress", k=4)
    pd.testing.assert_frame_equal(result, again)
    assert list(result.columns) == ["item_id", "colour", "retrieval_score", "rerank_score"]
    assert (result["colour"] == "c" + result["item_id"].astype(str)).all()  # each row's own item's value
    assert [len(t) for t in fresh.search(["summer dress", "jeans"], k=2)] == [2, 2]
    with pytest.raises(ValueError, match="3 embeddings"):
        SearchService(tiny, items, embeddings=fresh.embeddings[:3])
    with pytest.raises(ValueError, match="colour"):
        SearchService(tiny, items.drop(columns="colour"), columns=["colour"])


def test_service_query_cache_counts_hits(tiny):
    items = pd.DataFrame({"item_id": range(len(DOCS)), "document": DOCS})
    service = SearchService(tiny, items, index="exact")
    service.embed_queries(["dress", "dress", "jeans"])
    service.embed_queries(["dress"])
    assert service.query_cache.hits >= 1 and len(service.query_cache) == 2


WORDS = "black maxi dress with long sleeves for a summer wedding in june light linen denim jacket".split()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # tiny is only read
@given(start=st.integers(0, len(WORDS) - 1), length=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_int8_service_answers_a_query_the_same_whatever_its_batch_or_history(tiny, start, length, seed):
    """Row-wise int8: the query alone, inside a batch of 64 of other lengths, and served after a cache
    warm-up by a batch that held it: the same ranked ids, scores within 1e-6."""
    rng = np.random.default_rng(seed)
    query = " ".join(WORDS[start:start + length])
    others = [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(63)]
    items = pd.DataFrame({"item_id": [f"sku{i}" for i in range(len(DOCS))], "document": DOCS})
    service = SearchService(quantize_int8(tiny, embeddings=True), items, index="exact")
    alone = service.encoder.encode([query], max_length=32)
    batched = service.encoder.encode([*others[:20], query, *others[20:]], max_length=32)[20:21]
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    fresh = SearchService(service.encoder, items, index="exact", embeddings=service.embeddings).search(query, k=6, depth=0)
    service.search([*others, query], k=6, depth=0)  # warm the cache with the query's batched embedding
    served = service.search(query, k=6, depth=0)
    assert service.query_cache.hits >= 1
    assert served["item_id"].tolist() == fresh["item_id"].tolist()
    np.testing.assert_allclose(served["retrieval_score"], fresh["retrieval_score"], atol=1e-6, rtol=0)
    scores = (alone @ service.embeddings.T)[0]
    np.testing.assert_allclose(served["retrieval_score"], scores.sort(descending=True).values.numpy(), atol=1e-6, rtol=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 12), depth=st.integers(0, 12), seed=st.integers(0, 10**6))
def test_cascade_scores_order(n, depth, seed):
    rng = np.random.default_rng(seed)
    retrieved = rng.permutation(n)[None]
    rerank = torch.as_tensor(rng.permutation(n).astype("float32"))[None]
    order = torch.argsort(cascade_scores(retrieved, rerank, depth), descending=True)[0].numpy()
    head = min(depth, n)
    assert set(order[:head]) == set(retrieved[0, :head])                   # the reranked set is the retrieved head
    assert (np.diff(rerank[0, order[:head]].numpy()) <= 0).all()           # ...in rerank order
    np.testing.assert_array_equal(order[head:], retrieved[0, head:])       # the rest keep retrieval order
    if depth == 0:
        np.testing.assert_array_equal(order, retrieved[0])


def test_hard_negatives_and_reranker_training(tiny_reranker):
    q, d = torch.eye(6)[:3], torch.eye(6) + 0.05
    negatives = hard_negatives(q, d, positives=[0, 1, 2], n=2, pool=4)
    assert negatives.shape == (3, 2) and all(p not in row for p, row in zip([0, 1, 2], negatives))
    groups = [[DOCS[i], DOCS[(i + 1) % 6], DOCS[(i + 2) % 6]] for i in range(4)]
    losses = train_reranker(tiny_reranker, DOCS[:4], groups, batch_size=2, progress=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    graded = train_reranker(tiny_reranker, DOCS[:4], groups, grades=[[2, 1, 0]] * 4, batch_size=4, progress=False)
    assert len(graded) == 1
    with pytest.raises(ValueError, match="grades must have shape"):
        train_reranker(tiny_reranker, DOCS[:4], groups, grades=[[2, 1]] * 4, progress=False)
    assert not tiny_reranker.training
    with pytest.raises(ValueError, match="same size"):
        train_reranker(tiny_reranker, DOCS[:2], [["a", "b"], ["a"]], progress=False)


@settings(max_examples=40, deadline=None)
@given(grades=st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=2, max_size=6), seed=st.integers(0, 10**6))
def test_listwise_loss_matches_autograd_free_reference_and_its_gradient(grades, seed):
    if max(grades) == 0:
        grades[0] = 2.0
    g = torch.tensor([grades])
    scores = torch.randn(1, len(grades), generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    loss = listwise_loss(scores, g)
    target = (2 ** g - 1) / (2 ** g - 1).sum()
    reference = -(target * torch.log(torch.exp(scores) / torch.exp(scores).sum())).sum()
    torch.testing.assert_close(loss, reference)
    loss.backward()
    torch.testing.assert_close(scores.grad, torch.softmax(scores.detach(), 1) - target)  # ListNet's gradient


def test_random_negatives_avoid_the_group():
    exclude = np.array([[0, 1, 2], [5, 6, 7]])
    out = random_negatives(10, exclude, n=4, seed=0)
    assert out.shape == (2, 4) and all(not set(o) & set(e) and len(set(o)) == 4 for o, e in zip(out, exclude))


def test_cost_model_recovers_a_linear_latency():
    depths = [0, 1, 2, 5, 10, 20]
    table = pd.DataFrame({"depth": depths + [100], "ms_p50": [3 + 2 * d for d in depths] + [100 * 1.5]},
                         index=[f"k={d}" for d in depths] + ["brute force (rerank all)"])
    model = fit_cost_model(table, 100)
    assert model["t_query_ms"] == pytest.approx(3) and model["t_pair_cascade_ms"] == pytest.approx(2)
    assert model["t_pair_brute_ms"] == pytest.approx(1.5)
    cascade, brute = predict_latency(model, [100, 1000], 5, lambda n: np.log(np.asarray(n, dtype=float)))
    np.testing.assert_allclose(brute, [150, 1500])
    np.testing.assert_allclose(cascade, [13, 13 + np.log(10)])


def test_zipf_log_and_sub_catalogue():
    log = zipf_query_log(["a", "b", "c", "a"], 500, seed=1)
    assert log == zipf_query_log(["a", "b", "c"], 500, seed=1)
    assert log.count("a") > log.count("b") > log.count("c")
    from recbook.data import SearchTask
    items = pd.DataFrame({"item_id": [1, 2, 3, 4], "document": list("abcd"), "class": list("xxyy")})
    queries = {"test": pd.DataFrame({"query": ["q1", "q2", "q3"], "item_id": [1, 3, 4], "ambiguous": False, "class": list("xyy")})}
    task = SearchTask(items, queries, ["class"])
    small = sub_catalogue(task, 2, seed=0)
    assert len(small.items) == 2 and set(small.split("test")["item_id"]) <= set(small.items["item_id"])
    assert small.relevance("test").shape == (len(small.split("test")), 2)
    assert sub_catalogue(task, None) is task


def test_a_query_is_retrieved_the_same_alone_or_in_any_batch():
    """Near-ties that a batched matrix product can reorder in its last bit: items come in pairs 1e-7 apart, and the
    service must give every query the ranking it gets alone, whatever batch it arrives in."""
    import pandas as pd
    from recbook.infer import SearchService
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(200, 64, generator=g), dim=-1)
    items = torch.cat([base, base + 1e-7 * torch.randn(200, 64, generator=g)])
    vectors = {f"q{i}": v for i, v in enumerate(torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=-1))}

    class Fixed:  # an encoder that knows its queries' vectors
        query_max_length = 8
        def encode(self, texts, max_length=None):
            return torch.stack([vectors[t] for t in texts])
    catalogue = pd.DataFrame({"item_id": [str(i) for i in range(len(items))], "document": ["d"] * len(items)})
    service = SearchService(Fixed(), catalogue, index="exact", embeddings=items, query_cache_size=0)
    queries = list(vectors)
    together = service.retrieve(queries, 10)[1]
    for size in (1, 7, 32):
        apart = np.concatenate([service.retrieve(queries[i:i + size], 10)[1] for i in range(0, len(queries), size)])
        np.testing.assert_array_equal(apart, together)
