"Chapter 07b: the sequence augmentations' invariants, the few-user schedule, the attribute graph and neighbour shrinkage."
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook.histories import build_recommendation_task
from recbook.reclowdata import (attribute_graph, augmenter, crop, fit_few_users, mask, movielens_attributes,
                                neighbour_weights, paired_gains, reorder, shrink_to_neighbours, training_users)
from recbook.recommend import PAD, SequenceRecommender
from recbook.tables import DataError

windows_strategy = st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=9), min_size=1, max_size=6)


def as_windows(rows, width=10):
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for r, items in enumerate(rows):
        if items:
            out[r, width - len(items):] = torch.tensor(items)
    return out


@settings(max_examples=60, deadline=None)
@given(windows_strategy, st.integers(0, 10_000), st.floats(0.1, 1.0))
def test_crop_keeps_a_right_aligned_stretch(rows, seed, keep):
    windows = as_windows(rows)
    out = crop(windows, torch.Generator().manual_seed(seed), keep=keep)
    assert out.shape == windows.shape
    for before, after in zip(windows, out):
        real, kept = before[before != PAD], after[after != PAD]
        assert len(kept) == min(len(real), max(2, math.ceil(keep * len(real))))
        assert (after[len(after) - len(kept):] != PAD).all()  # right-aligned: the empty slots come first
        assert any(torch.equal(kept, real[s:s + len(kept)]) for s in range(len(real) - len(kept) + 1))


@settings(max_examples=60, deadline=None)
@given(windows_strategy, st.integers(0, 10_000), st.floats(0.0, 0.9))
def test_mask_empties_slots_in_place(rows, seed, share):
    windows = as_windows(rows)
    out = mask(windows, torch.Generator().manual_seed(seed), share=share)
    for before, after in zip(windows, out):
        n = int((before != PAD).sum())
        assert ((after == before) | (after == PAD)).all()  # nothing moved, nothing invented
        emptied = int(((after == PAD) & (before != PAD)).sum())
        assert emptied == max(0, min(int(share * n), n - 2))


@settings(max_examples=60, deadline=None)
@given(windows_strategy, st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_reorder_permutes_one_short_stretch(rows, seed, share):
    windows = as_windows(rows)
    out = reorder(windows, torch.Generator().manual_seed(seed), share=share)
    for before, after in zip(windows, out):
        n = int((before != PAD).sum())
        assert sorted(after.tolist()) == sorted(before.tolist())
        assert torch.equal(after == PAD, before == PAD)
        moved = (after != before).nonzero().flatten()
        if len(moved):
            assert moved.max() - moved.min() < min(n, max(2, int(share * n)))


@settings(max_examples=30, deadline=None)
@given(windows_strategy, st.integers(0, 10_000), st.sampled_from(["crop", "mask", "reorder", "random"]))
def test_augmenter_is_seeded_and_never_invents_items(rows, seed, kind):
    windows = as_windows(rows)
    first = augmenter(kind)(windows, torch.Generator().manual_seed(seed))
    again = augmenter(kind)(windows, torch.Generator().manual_seed(seed))
    assert torch.equal(first, again)
    for before, after in zip(windows, first):
        assert set(after[after != PAD].tolist()) <= set(before[before != PAD].tolist())


def test_augmenter_rates_and_bad_settings():
    windows = as_windows([[1, 2, 3, 4, 5, 6, 7, 8]] * 64)
    assert torch.equal(augmenter("reorder", rate=0.0)(windows, torch.Generator()), windows)
    changed = (augmenter("mask", rate=1.0)(windows, torch.Generator().manual_seed(0)) != windows).any(1)
    assert changed.all()
    with pytest.raises(ValueError, match="kind must be one of"):
        augmenter("shuffle")
    with pytest.raises(ValueError):
        augmenter("crop", rate=1.5)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    log = pd.DataFrame({"user": np.repeat(np.arange(40), 6).astype(str), "item": rng.choice(list("abcdef"), 240,
                        p=[0.3, 0.3, 0.2, 0.1, 0.07, 0.03]), "time": np.arange(240)})
    return build_recommendation_task(log, user="user", item="item", timestamp="time", min_interactions=3, cold_max=10)


def test_training_users(toy):
    users = training_users(toy, 0.25, seed=1)
    assert len(users) == 10 and len(set(users)) == 10
    assert set(users) <= set(toy.train["user_id"])
    assert users == training_users(toy, 0.25, seed=1) and users != training_users(toy, 0.25, seed=2)
    with pytest.raises(ValueError):
        training_users(toy, 0.0, seed=0)


def test_fit_few_users_scales_the_schedule(toy):
    text = torch.randn(len(toy.items), 6)
    _, log = fit_few_users(toy, text, 0.25, seed=0, epochs=1, augment=augmenter("random"),
                           shape=dict(dim=8, layers=1, heads=1, max_length=6))
    assert log["epoch"].max() == 4  # one epoch of the full run is four epochs of a quarter of the users


def test_attribute_graph_splits_several_values_and_checks_columns():
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "genres": ["Drama, War", "Drama", None], "decade": ["1990s", None, "1980s"]})
    graph = attribute_graph(items, ["genres", "decade"])
    assert sorted(graph.tails("item:a", "has genres")) == ["genres=Drama", "genres=War"]
    assert graph.tails("item:b", "has decade") == [] and graph.tails("item:c", "has genres") == []
    assert graph.heads("genres=Drama", "has genres") == ["item:a", "item:b"]
    with pytest.raises(DataError, match="lacks the columns"):
        attribute_graph(items, ["director"])


def test_movielens_attributes():
    frame = pd.DataFrame({"item_id": ["1", "1", "2", "3"], "genres": ["Comedy", "Comedy", "Drama, War", "Drama"],
                          "year": [1995, 1995, 1982, np.nan]})
    items = movielens_attributes(frame)
    assert items["decade"].iloc[:2].tolist() == ["1990s", "1980s"] and items["decade"].isna().iloc[2] and len(items) == 3


def test_neighbour_weights_and_shrinkage(toy):
    ids = toy.items["item_id"].tolist()
    items = pd.DataFrame({"item_id": ids, "genres": ["Drama", "Drama, War", "War", "Comedy", "Comedy, Drama", "Horror"][:len(ids)]})
    graph = attribute_graph(items, ["genres"])
    weights = neighbour_weights(graph, toy, min_count=10)
    counts = torch.tensor(toy.items["train_count"].to_numpy())
    assert (weights.diagonal() == 0).all() and (weights >= 0).all()
    assert (weights[:, counts <= 10] == 0).all()  # only warm items are neighbours
    rows = weights.sum(1)
    assert torch.allclose(rows[rows > 0], torch.ones(int((rows > 0).sum())))
    model = SequenceRecommender(len(ids), dim=4, layers=1, heads=1, max_length=5)
    ids_before = model.item_ids.weight.detach().clone()
    kappa = 7.0
    shrunk = shrink_to_neighbours(model, toy, weights, kappa).item_ids.weight.detach()
    share = (kappa / (counts.float() + kappa))[:, None] * (rows[:, None] > 0)
    assert torch.allclose(shrunk, (1 - share) * ids_before + share * (weights @ ids_before), atol=1e-6)
    assert torch.equal(model.item_ids.weight, ids_before)  # the model itself is untouched
    text_only = SequenceRecommender(len(ids), "text", torch.randn(len(ids), 3), dim=4, layers=1, heads=1, max_length=5)
    with pytest.raises(ValueError, match="needs id vectors"):
        shrink_to_neighbours(text_only, toy, weights, 1.0)


def test_paired_gains():
    runs = pd.DataFrame({"fraction": 0.1, "seed": [0, 0, 1, 1, 2, 2], "augmentation": ["none", "crop"] * 3,
                         "ndcg@10": [0.10, 0.12, 0.20, 0.19, 0.05, 0.09]})
    gains = paired_gains(runs).loc[(0.1, "crop")]
    assert gains["median"] == pytest.approx(0.02) and gains["min"] == pytest.approx(-0.01)
    assert gains["max"] == pytest.approx(0.04) and gains["positive"] == 2 and gains["seeds"] == 3
