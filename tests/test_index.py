"""Chapter 05a: exact search, FAISS indexes, recall against exact search, synthetic vectors, sweeps."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook.index import (INDEX_KINDS, VectorIndex, ann_recall, clustered_vectors, exact_search, hnsw_target, index_sweep,
                           two_nn_dimension)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), dim=st.integers(1, 12), k=st.integers(1, 20), chunk=st.integers(1, 64), seed=st.integers(0, 10**6))
def test_exact_search_matches_numpy_whatever_the_chunking(n, dim, k, chunk, seed):
    rng = np.random.default_rng(seed)
    vectors, queries = rng.standard_normal((n, dim)).astype("float32"), rng.standard_normal((3, dim)).astype("float32")
    scores, ids = exact_search(queries, vectors, k, chunk=chunk)
    reference = queries @ vectors.T
    kk = min(k, n)
    assert ids.shape == (3, kk)
    np.testing.assert_allclose(scores, np.sort(reference, axis=1)[:, ::-1][:, :kk], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(reference, ids, 1), scores, rtol=1e-4, atol=1e-4)  # ids carry those scores


def test_exact_search_accepts_tensors_and_rejects_bad_input():
    vectors = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    scores, ids = exact_search(vectors[:2], vectors, 1)
    np.testing.assert_array_equal(ids[:, 0], [0, 1])  # a unit vector is its own nearest neighbour
    with pytest.raises(ValueError, match="dimension"):
        exact_search(torch.randn(2, 4), vectors, 3)
    with pytest.raises(ValueError, match="k must be"):
        exact_search(vectors[:2], vectors, 0)
    with pytest.raises(ValueError, match="NaN"):
        exact_search(vectors[:2], vectors.masked_fill(torch.eye(50, 8).bool(), float("nan")), 3)
    with pytest.raises(ValueError, match="non-empty"):
        exact_search(np.zeros((0, 8)), vectors, 3)


@pytest.fixture(scope="module")
def data():
    return clustered_vectors(3000, dim=32, clusters=30, intrinsic_dim=6), clustered_vectors(40, dim=32, clusters=30, intrinsic_dim=6, seed=1)


@pytest.mark.parametrize("kind", ["exact", "flat"])
def test_exact_kinds_agree_with_exact_search(data, kind):
    vectors, queries = data
    truth = exact_search(queries, vectors, 10)[1]
    assert ann_recall(VectorIndex(vectors, kind=kind).search(queries, 10)[1], truth) == 1.0


def test_ivf_probing_every_cell_is_exact_and_fewer_cells_find_less(data):
    vectors, queries = data
    truth = exact_search(queries, vectors, 10)[1]
    index = VectorIndex(vectors, kind="ivf", nlist=16)
    assert ann_recall(index.set(nprobe=16).search(queries, 10)[1], truth) == 1.0
    assert ann_recall(index.set(nprobe=1).search(queries, 10)[1], truth) < 1.0
    assert index.knobs == {"nlist": 16, "nprobe": 1}


def test_hnsw_recall_is_high_on_structured_data_and_grows_with_ef(data):
    vectors, queries = data
    truth = exact_search(queries, vectors, 10)[1]
    index = VectorIndex(vectors, kind="hnsw", M=16, ef_construction=40)
    low = ann_recall(index.set(ef_search=10).search(queries, 10)[1], truth)
    high = ann_recall(index.set(ef_search=200).search(queries, 10)[1], truth)
    assert high >= 0.95 and high >= low
    assert index.knobs["ef_search"] == 200 and index.memory_bytes > vectors.nbytes


def test_index_errors_and_small_catalogues():
    vectors = np.eye(5, dtype="float32")
    with pytest.raises(ValueError, match="Unknown index kind"):
        VectorIndex(vectors, kind="lsh")
    index = VectorIndex(vectors, kind="hnsw")
    assert index.search(vectors[:1], 50)[1].shape == (1, 5)  # k larger than the catalogue: clamped
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.ones((1, 3)), 2)
    for kind in INDEX_KINDS:
        assert len(VectorIndex(vectors, kind=kind)) == 5


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(-1, 20), min_size=4, max_size=4), min_size=1, max_size=5))
def test_ann_recall_is_a_fraction_and_one_against_itself(rows):
    found = np.array(rows)
    exact = np.array([np.random.default_rng(i).permutation(30)[:4] for i in range(len(rows))])
    assert 0.0 <= ann_recall(found, exact) <= 1.0
    assert ann_recall(exact, exact) == 1.0
    with pytest.raises(ValueError, match="same number of rows"):
        ann_recall(found, exact[:0])


def test_two_nn_recovers_a_known_dimension_and_generator_is_seeded():
    rng = np.random.default_rng(0)
    x = np.zeros((2000, 30), dtype="float32")
    x[:, :3] = rng.standard_normal((2000, 3))
    assert two_nn_dimension(x) == pytest.approx(3, abs=0.5)
    a, b = clustered_vectors(100, seed=3), clustered_vectors(100, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="intrinsic_dim"):
        clustered_vectors(10, dim=8, intrinsic_dim=9)


def test_index_sweep_and_target(data):
    vectors, queries = data
    table = index_sweep(vectors, queries, k=5, repeats=1, progress=False,
                        sweep={"exact": [{}], "hnsw": [{"ef_search": 8}, {"ef_search": 128}]})
    assert list(table["kind"]) == ["exact", "hnsw", "hnsw"]
    assert table.loc[table["kind"] == "exact", "recall@k"].item() == 1.0
    assert (table["ms_per_query"] > 0).all() and (table["memory_mb"] > 0).all()
    target = hnsw_target(table)
    assert target["n"] == 3000 and target["ef_search"] in (8, 128) and target["exact_ms"] > 0
