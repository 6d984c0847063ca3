"""Chapter 09: sharded IVF-PQ, its recall trade-off, and the paper estimate."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from recbook.index import ann_recall, clustered_vectors, exact_search
from recbook.scale import (build_in_shards, index_bytes, paper_estimate, pq_study, refine_search, train_ivfpq,
                           training_throughput)

VECTORS = clustered_vectors(12_000, dim=32, clusters=40, seed=1)
QUERIES = clustered_vectors(30, dim=32, clusters=40, seed=2)
TRAINED = train_ivfpq(VECTORS, lists=16, m=8)


@settings(max_examples=8, deadline=None)
@given(shards=st.integers(1, 7))
def test_shards_merge_into_the_index_built_in_one_go(shards):
    import faiss
    merged, sizes = build_in_shards(TRAINED, VECTORS, shards)
    one_go = faiss.clone_index(TRAINED)
    one_go.add_with_ids(VECTORS, np.arange(len(VECTORS), dtype=np.int64))
    merged.nprobe = one_go.nprobe = 4
    assert merged.ntotal == len(VECTORS) and len(sizes) == shards
    np.testing.assert_array_equal(merged.search(QUERIES, 10)[1], one_go.search(QUERIES, 10)[1])


def test_pq_is_small_and_recall_grows_with_nprobe():
    merged, _ = build_in_shards(TRAINED, VECTORS, 3)
    assert index_bytes(merged) / len(VECTORS) < VECTORS.shape[1] * 4 / 2  # 8 code bytes + id, not 128 float bytes
    exact = exact_search(QUERIES, VECTORS, 10, device="cpu")[1]
    recalls = []
    for nprobe in (1, 4, 16):
        merged.nprobe = nprobe
        recalls.append(ann_recall(merged.search(QUERIES, 10)[1], exact))
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]


def test_refinement_recovers_recall_and_is_exact_with_every_candidate(tmp_path):
    merged, _ = build_in_shards(TRAINED, VECTORS, 2)
    exact = np.asarray(exact_search(QUERIES, VECTORS, 10, device="cpu")[1])
    merged.nprobe = 2
    plain = ann_recall(merged.search(QUERIES, 10)[1], exact)
    on_disk = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=VECTORS.shape)
    on_disk[:] = VECTORS
    refined = refine_search(merged, QUERIES, on_disk, 10, candidates=100)
    assert ann_recall(refined, exact) > plain and refined.shape == (len(QUERIES), 10)
    merged.nprobe = 16  # all cells: every vector is a candidate, refinement is exact search
    np.testing.assert_array_equal(refine_search(merged, QUERIES, VECTORS, 10, candidates=len(VECTORS)), exact)


def test_pq_study_table():
    table = pq_study(VECTORS, QUERIES, lists=16, ms=(4, 8), nprobes=(2, 16), shards=2, train_sample=8000)
    assert list(table["index"])[0] == "exact (float32)" and len(table) == 1 + 2 * 2
    assert table["recall@10"].between(0, 1).all() and (table["ms_per_query"] > 0).all()
    assert (table["recall@10 refined"] >= table["recall@10"]).all()  # 100 exactly re-scored candidates include the top 10
    pq = table.dropna(subset=["m"])
    assert pq.groupby("m")["bytes_per_vector"].first().is_monotonic_increasing  # more sub-vectors, more bytes


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="multiple"):
        train_ivfpq(VECTORS, lists=16, m=5)
    with pytest.raises(ValueError, match="at least"):
        train_ivfpq(VECTORS[:100], lists=16, m=8)
    with pytest.raises(ValueError, match="at least one process"):
        training_throughput(0, 1)
    with pytest.raises(ValueError, match="positive"):
        paper_estimate(1e8, 1e9, 100, -1, 0.9, 40)


@given(items=st.floats(1e3, 1e10), machines=st.integers(2, 1000), efficiency=st.floats(0.1, 1.0))
def test_estimate_scales_inversely_with_machines(items, machines, efficiency):
    table = paper_estimate(items, 1e9, 200.0, 20.0, efficiency, 40.0, machines=(1, machines))
    one, many = table.loc[1], table.loc[machines]
    assert np.isclose(one["embed catalogue (h)"] / many["embed catalogue (h)"], machines)
    assert np.isclose(one["train 1 epoch(s) (days)"] / many["train 1 epoch(s) (days)"], machines * efficiency)
    assert one["index memory (GB)"] == many["index memory (GB)"] == pytest.approx(items * 40 / 1e9)
