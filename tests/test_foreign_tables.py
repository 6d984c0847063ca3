"""Chapters 01a, 02 and 03 on tables recbook has never seen: other scripts, other shapes, other file formats."""
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook.data import (REVIEWS_FILE, DataError, build_scoring_task, build_search_task, from_table, load_reviews,
                          read_table)
from recbook.tables import text_tokens

# item names, a review pattern, a title that names the item, and a title every item could have
SCRIPTS = {
    "latin": (["lamp", "sofa", "chair", "desk", "rug", "vase", "wardrobe", "mattress", "curtain", "mirror", "stool", "shelf"],
              "really nice {name}, bought it for the {r}th time", "beautiful {name}", "really nice"),
    "cjk": (["台灯", "沙发", "椅子", "书桌", "地毯", "花瓶", "衣柜", "床垫", "窗帘", "镜子", "茶几", "吊灯"],
            "这个{name}非常好用，第{r}次购买", "{name}很漂亮", "非常好用"),
    "cyrillic": (["лампа", "диван", "стул", "стол", "ковёр", "ваза", "шкаф", "матрас", "штора", "зеркало", "табурет", "полка"],
                 "очень хороший {name}, покупаю {r} раз", "красивый {name}", "очень хороший"),
    "greek": (["λάμπα", "καναπές", "καρέκλα", "γραφείο", "χαλί", "βάζο", "ντουλάπα", "στρώμα", "κουρτίνα", "καθρέφτης",
               "σκαμπό", "ράφι"], "πολύ ωραίο {name}, το αγόρασα {r} φορές", "όμορφο {name}", "πολύ ωραίο"),
}


def reviews(script="latin", per_item=20, items=12):
    "One row per review: its own text, a title that names the item on every other row, zero-padded item ids."
    names, text, title, generic = SCRIPTS[script]
    rows = [{"user": f"u{i * per_item + r}", "item": f"{i:05d}", "stars": 1 + (i + r) % 5, "kind": "AB"[i % 2],
             "body": text.format(name=names[i % len(names)], r=i * per_item + r), "title": title.format(name=names[i % len(names)]) if r % 2 else generic}
            for i in range(items) for r in range(per_item)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("features", [["kind"], []])
def test_search_has_queries_in_every_split_in_any_script(script, features):
    inter = from_table(reviews(script), "user", "item", "stars", text="body", query="title", item_features=features)
    task = build_search_task(inter)
    counts = task.counts
    assert all(counts[s] >= 10 for s in ("train", "valid", "test")), counts
    assert counts["catalogue"] == 12 and counts["dropped_copied_text"] == 0
    generic = SCRIPTS[script][3]
    assert task.split("test", ambiguous=True)["query"].eq(generic).all()  # in every document: names no item
    assert not task.split("test")["query"].eq(generic).any()
    assert task.items["item_id"].str.fullmatch(r"\d{5}").all()  # zero-padded ids kept
    assert (task.relevance("test").eq(2).sum(1) == 1).all()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_scoring_in_any_script_counts_its_rows(script):
    task = build_scoring_task(from_table(reviews(script, per_item=5, items=20), "user", "item", "stars", text="body"))
    assert task.counts["rows"] == 100 and sum(task.counts[s] for s in ("train", "valid", "test")) == 100


def test_one_text_per_item_keeps_every_row_and_splits_queries_by_item():
    "A movie-like table: the text describes the item and the query is its title, on every one of its rows."
    names = [f"{w} {k}" for w in SCRIPTS["latin"][0] for k in ("red", "blue", "green")]  # 36 items
    rows = [{"user": u, "item": i, "rating": 1 + (u + i) % 5, "title": name.title(), "text": f"{name}, a {name.split()[1]} thing"}
            for i, name in enumerate(names) for u in range(8)]
    inter = from_table(pd.DataFrame(rows), "user", "item", "rating", text="text", query="title")
    task = build_search_task(inter, min_queries=4)
    assert task.counts["catalogue"] == 36 and task.counts["dropped_copied_text"] == 0
    train, test = set(task.split("train")["item_id"]), set(task.split("test")["item_id"])
    assert not train & test  # a title is never both learnt and measured
    assert task.split("test").groupby("item_id").size().max() == 1  # a title repeated on 8 rows is one query
    assert len(build_scoring_task(inter).split("train")) > 0


def test_per_user_text_is_an_attribute_not_a_copy():
    "Each user's profile text repeats on all their rows: no row is dropped as a copy."
    names = SCRIPTS["latin"][0]
    rows = [{"user": u, "item": i, "rating": 3, "name": names[i], "profile": f"profile of user {u}", "title": f"my {names[i]}"}
            for u in range(40) for i in range(12) if (u + i) % 3]
    inter = from_table(pd.DataFrame(rows), "user", "item", "rating", text="profile", query="title", item_features=["name"])
    task = build_search_task(inter)
    assert task.counts["dropped_copied_text"] == 0 and task.counts["rows"] == len(rows)
    assert all(task.counts[s] >= 10 for s in ("train", "valid", "test"))


def test_copied_reviews_are_dropped_and_counted():
    table = reviews()
    copies = table.iloc[:3].assign(user=["x1", "x2", "x3"], item="00005")  # the same reviews posted under another item
    task = build_search_task(from_table(pd.concat([table, copies]), "user", "item", "stars", text="body", query="title"))
    assert task.counts["dropped_copied_text"] == 3


def test_no_rating_string_labels_and_mixed_ids():
    table = reviews(per_item=10, items=20).assign(label=lambda t: np.where(t["stars"] > 3, "good", "bad"))
    search = build_search_task(from_table(table, "user", "item", text="body", query="title"), min_queries=3)
    assert search.counts["test"] >= 3  # search needs no rating
    with pytest.raises(DataError, match="must be numbers.*leave rating= out"):
        from_table(table, "user", "item", "label", text="body")
    with pytest.raises(DataError, match="numeric `rating`"):
        build_scoring_task(from_table(table, "user", "item", text="body"))
    mixed = table.assign(item=[int(i) if n % 2 else i for n, i in enumerate(table["item"])])  # 7 and '00007' side by side
    scoring = build_scoring_task(from_table(mixed, "user", "item", "stars", text="body"))
    assert {type(i) for s in scoring.splits.values() for i in s["item_id"]} == {str}


def test_too_few_queries_and_tiny_catalogues_stop_with_the_fix():
    table = reviews()
    generic = table.assign(title=SCRIPTS["latin"][3])  # no title names an item
    with pytest.raises(DataError, match=r"Too few queries name an item.*Fix: .*min_queries="):
        build_search_task(from_table(generic, "user", "item", "stars", text="body", query="title"))
    one = table[table["item"] == "00000"]
    with pytest.raises(DataError, match="needs at least 2"):
        build_search_task(from_table(one, "user", "item", "stars", text="body", query="title"))
    with pytest.raises(DataError, match="at least 5 interactions"):
        build_search_task(from_table(table.head(3), "user", "item", "stars", text="body", query="title"))


# --- reading files ------------------------------------------------------------------------------

TABLE = pd.DataFrame({"user": ["007", "042", "100"], "item": ["00001", "00002", "00003"], "rating": [5, 3, 4],
                      "text": ["Crème brûlée; très bon", "Déjà vu, \"quoted\"", "Smørrebrød"]})
WRITERS = {
    "latin-1.csv": lambda t, p: t.to_csv(p, index=False, encoding="latin-1"),
    "utf-16.csv": lambda t, p: t.to_csv(p, index=False, encoding="utf-16"),
    "semicolon.csv": lambda t, p: t.to_csv(p, index=False, sep=";"),
    "tabs.tsv": lambda t, p: t.to_csv(p, index=False, sep="\t"),
    "gzipped.csv.gz": lambda t, p: t.to_csv(p, index=False),
    "bzipped.tsv.bz2": lambda t, p: t.to_csv(p, index=False, sep="\t"),
    "xz.csv.xz": lambda t, p: t.to_csv(p, index=False),
    "zipped.zip": lambda t, p: t.to_csv(p, index=False, compression={"method": "zip", "archive_name": "inner.csv"}),
    "lines.jsonl": lambda t, p: t.to_json(p, orient="records", lines=True, force_ascii=False),
    "records.json": lambda t, p: t.to_json(p, orient="records", force_ascii=False),
    "columns.parquet": lambda t, p: t.to_parquet(p),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_reads_back_the_same_table_with_ids_as_text(tmp_path, name):
    WRITERS[name](TABLE, tmp_path / name)
    back = read_table(tmp_path / name, ids=["user", "item"])
    pd.testing.assert_frame_equal(back.astype(object), TABLE.astype(object))
    assert read_table(tmp_path / name)["item"].tolist() == TABLE["item"].tolist()  # zero-padded: text even unasked


def test_given_separator_and_encoding_win(tmp_path):
    TABLE.to_csv(tmp_path / "x.txt", index=False, sep="|", encoding="cp1252")
    back = read_table(tmp_path / "x.txt", sep="|", encoding="cp1252")
    assert back["text"].tolist() == TABLE["text"].tolist()


def test_bad_files_raise_data_errors(tmp_path):
    for name, data in {"x.csv.gz": b"not gzip", "x.parquet": b"PAR1 nope", "x.zip": b"PK nope"}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match="corrupt"):
            read_table(tmp_path / name)
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="utf-8"):
        read_table(tmp_path / "x.csv", encoding="utf-8x")
    (tmp_path / "x.xls").write_text("")
    with pytest.raises(DataError, match="Unsupported"):
        read_table(tmp_path / "x.xls")
    with pytest.raises(FileNotFoundError, match="No data file"):
        read_table(tmp_path / "none.csv")


def test_shipped_data_checksum_is_verified(tmp_path, monkeypatch):
    from recbook.core import data_dir
    shutil.copy(data_dir() / REVIEWS_FILE, tmp_path / REVIEWS_FILE)
    with open(tmp_path / REVIEWS_FILE, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00")
    monkeypatch.setenv("RECBOOK_DATA", str(tmp_path))
    with pytest.raises(DataError, match="SHA-256"):
        load_reviews()


# --- invariants ---------------------------------------------------------------------------------

@given(st.text())
def test_tokens_of_any_text_are_words(text):
    for token in text_tokens(text):
        assert token and re.fullmatch(r"\w+", token)


BM25_DOCS = ["a red dress for summer", "blue denim jeans", "红色连衣裙 很漂亮", "красное платье", "όμορφο φόρεμα"]


@given(st.lists(st.text(max_size=30), max_size=6))
@settings(deadline=None, max_examples=50)
def test_bm25_scores_any_queries_finitely(queries):
    from recbook.model import BM25Ranker
    scores = BM25Ranker(BM25_DOCS).scores(queries)
    assert scores.shape == (len(queries), len(BM25_DOCS)) and torch.isfinite(scores).all() and (scores >= 0).all()


def test_bm25_gives_zeros_to_stopword_queries_and_reads_chinese():
    from recbook.model import BM25Ranker
    scores = BM25Ranker(BM25_DOCS).scores(["It", "To Be or Not to Be", "连衣裙"])
    assert scores[:2].eq(0).all() and scores[2].argmax() == 2


# --- chapter 03's entry points ------------------------------------------------------------------

def test_encoders_fail_at_once_offline_and_name_missing_folders(monkeypatch, tmp_path):
    from recbook.model import load_encoder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hub cannot be reached.*HF_HUB_OFFLINE"):
        load_encoder("no-such-org/no-such-model-xyz")
    for missing in [str(tmp_path / "nope"), "./nope", "~/surely-not-here", f"{tmp_path.name}/a/b"]:
        with pytest.raises(FileNotFoundError, match="no such folder"):
            load_encoder(missing)


def test_training_refuses_empty_input(tokenizer):
    from conftest import tiny_bert
    from recbook.model import BiEncoder, CrossEncoderScorer, train_bi_encoder, train_scorer
    encoder = tiny_bert(tokenizer)
    with pytest.raises(ValueError, match="No training pairs"):
        train_bi_encoder(BiEncoder(encoder, tokenizer), [], [], [], progress=False)
    with pytest.raises(ValueError, match="No training rows"):
        train_scorer(CrossEncoderScorer(encoder, tokenizer), [], [], [], progress=False)
