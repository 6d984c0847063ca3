"Chapter 03b: the recommenders against reference libraries, the causal mask, serving and saving, bad input."
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from sklearn.linear_model import Ridge
from sklearn.metrics.pairwise import cosine_similarity

from recbook.cli import main
from recbook.histories import build_recommendation_task, evaluate_recommendations
from recbook.recommend import (PAD, SequenceRecommender, ease_weights, fit_sequence_recommender, interaction_matrix,
                               item_knn_weights, item_text_vectors, load_recommender, next_item_loss, pad_sequences,
                               save_recommender, sequence_scores, training_windows, user_sequences)

TITLES = ["Red Shoes", "Красные туфли", "赤い靴", "Κόκκινα παπούτσια", "Blue Coat", "Синее пальто", "青いコート",
          "Μπλε παλτό", "Green Hat", "Зелёная шляпа", "緑の帽子", "Πράσινο καπέλο"]


def toy_log(users=30, items=12, per_user=8, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        chosen = rng.choice(items, size=per_user, replace=False)
        rows += [{"user": f"u{u}", "item": f"{i:03d}", "time": t, "stars": int(rng.integers(1, 6)), "title": TITLES[i % len(TITLES)]}
                 for t, i in enumerate(chosen)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def toy_task():
    return build_recommendation_task(toy_log(), user="user", item="item", timestamp="time", rating="stars", item_text="title")


@pytest.fixture(scope="module")
def trained(toy_task):
    model, log = fit_sequence_recommender(toy_task, "id", epochs=3, eval_every=1, dim=16, layers=1, heads=2, max_length=6)
    return model, log


@given(st.integers(0, 10_000), st.floats(0.5, 50))
@settings(max_examples=15, deadline=None)
def test_ease_is_a_ridge_regression_per_column_with_a_zero_diagonal(seed, l2):
    dense = (np.random.default_rng(seed).random((40, 7)) < 0.4).astype(np.float64)
    weights = ease_weights(sp.csr_matrix(dense), l2)
    assert np.all(np.diag(weights) == 0)
    for j in range(7):
        others = np.delete(np.arange(7), j)
        ridge = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(dense[:, others], dense[:, j])
        np.testing.assert_allclose(weights[others, j], ridge.coef_, atol=1e-7)


def test_item_knn_is_cosine_similarity_pruned_per_scored_item(toy_task):
    matrix, _ = interaction_matrix(toy_task, "test")
    reference = cosine_similarity(matrix.T.toarray())
    np.fill_diagonal(reference, 0)
    np.testing.assert_allclose(item_knn_weights(toy_task, "test", len(toy_task.items)), reference, atol=1e-6)
    pruned = item_knn_weights(toy_task, "test", 3)
    assert ((pruned != 0).sum(axis=0) <= 3).all()
    for j in range(pruned.shape[1]):  # the kept neighbours are the strongest
        kept = pruned[:, j] != 0
        if kept.any() and (~kept).any():
            assert reference[kept, j].min() >= reference[~kept, j].max() - 1e-9


@given(st.lists(st.integers(0, 19), min_size=2, max_size=8), st.integers(0, 7), st.integers(0, 3))
@settings(max_examples=30, deadline=None)
def test_no_position_sees_the_future(items, cut, seed):
    torch.manual_seed(seed)
    model = SequenceRecommender(n_items=20, dim=8, layers=2, heads=2, max_length=8).eval()
    sequence = pad_sequences([np.array(items)], 8)
    cut = min(cut, 6)
    changed = sequence.clone()
    changed[0, cut + 1:] = (changed[0, cut + 1:].clamp(min=0) + 1) % 20  # every later slot now holds another item
    with torch.no_grad():
        before, after = model(sequence), model(changed)
    assert torch.isfinite(before).all()
    first_real = int((sequence[0] == PAD).sum())
    if cut >= first_real:  # states of real positions up to the cut
        torch.testing.assert_close(before[0, first_real:cut + 1], after[0, first_real:cut + 1], atol=1e-6, rtol=0)


def test_a_users_scores_do_not_depend_on_batch_mates_or_padding(trained, toy_task):
    model, _ = trained
    histories = user_sequences(toy_task, "test")
    batch = sequence_scores(model, toy_task, "test", batch_size=64)
    for u in range(len(histories)):
        alone = model.scores(pad_sequences([histories[u]], model.max_length))[0]
        torch.testing.assert_close(alone, batch[u], atol=1e-5, rtol=0)


@given(st.lists(st.lists(st.integers(0, 9), min_size=2, max_size=15), min_size=1, max_size=6), st.integers(2, 5))
@settings(max_examples=30, deadline=None)
def test_every_item_but_a_users_first_is_a_target_exactly_once(histories, length):
    rows = [{"user": f"u{u}", "item": str(i), "time": t} for u, h in enumerate(histories) for t, i in enumerate(h)]
    frame = pd.DataFrame(rows)
    try:
        task = build_recommendation_task(frame, user="user", item="item", timestamp="time", min_interactions=3)
    except ValueError:
        return  # too short to split: chapter 02b's error
    windows, _ = training_windows(task, length)
    targets = windows[:, 1:][(windows[:, 1:] != PAD) & (windows[:, :-1] != PAD)]
    train = task.train.sort_values("position", kind="stable")
    expected = train.groupby("user_id", sort=False)["item_id"].apply(lambda s: list(s)[1:]).sum()
    assert sorted(targets.tolist()) == sorted(task.item_positions(pd.Series(expected, dtype=object)).tolist())


def test_the_weighted_loss_is_cross_entropy_weighted_by_rating(toy_task):
    torch.manual_seed(0)
    model = SequenceRecommender(len(toy_task.items), dim=8, layers=1, heads=2, max_length=4).eval()
    windows, weights = training_windows(toy_task, 4, reward_weighted=True)
    logits = model(windows[:, :-1]) @ model.item_vectors().T
    keep = (windows[:, 1:] != PAD) & (windows[:, :-1] != PAD)
    each = F.cross_entropy(logits[keep], windows[:, 1:][keep], reduction="none")
    w = weights[:, 1:][keep]
    torch.testing.assert_close(next_item_loss(model, windows, weights), (each * w).sum() / w.sum())
    torch.testing.assert_close(next_item_loss(model, windows, torch.ones_like(weights)), each.mean())


def test_early_stopping_returns_the_best_validated_model(trained, toy_task):
    model, log = trained
    best = log["valid_ndcg@10"].max()
    again = evaluate_recommendations(sequence_scores(model, toy_task, "valid"), toy_task, "valid")["ndcg@10"]
    assert again == pytest.approx(best, abs=1e-9)


def test_text_aware_items_in_any_script_score_an_item_no_one_chose(tiny_encoder, toy_task):
    vectors = item_text_vectors(toy_task, tiny_encoder)
    assert vectors.shape[0] == len(toy_task.items)
    model, _ = fit_sequence_recommender(toy_task, "text", vectors, epochs=1, dim=8, layers=1, heads=2, max_length=6)
    items = model.item_vectors()
    assert torch.isfinite(items).all()
    # the same title in another script is another text, so another item vector
    assert not torch.allclose(items[0], items[1])


def test_recommend_excludes_the_history_and_round_trips(trained, toy_task, tmp_path):
    model, _ = trained
    folder = save_recommender(model, toy_task, tmp_path / "rec")
    recommender = load_recommender(folder)
    for user in toy_task.targets("test")["user_id"][:5]:
        top = recommender.recommend(user=user, k=len(toy_task.items))
        assert not set(top["item_id"]) & set(recommender.history_of(user))
        assert len(top) == len(toy_task.items) - len(set(recommender.history_of(user)))
    history = list(toy_task.items["item_id"][:3])
    torch.testing.assert_close(
        torch.tensor(recommender.recommend(history=history, k=5)["score"].to_numpy()),
        model.scores(pad_sequences([toy_task.item_positions(history)], model.max_length))[0]
        .masked_fill(torch.isin(torch.arange(len(toy_task.items)), torch.tensor(toy_task.item_positions(history))), -1e9)
        .topk(5).values, atol=1e-5, rtol=0)


def test_saving_never_touches_a_folder_it_did_not_write(trained, toy_task, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a saved recommender"):
        save_recommender(trained[0], toy_task, theirs)
    assert (theirs / "notes.txt").read_text() == "keep me" and len(list(theirs.iterdir())) == 1
    ours = save_recommender(trained[0], toy_task, tmp_path / "ours")
    save_recommender(trained[0], toy_task, ours)  # its own earlier save is replaced
    assert sorted(p.name for p in ours.iterdir()) == sorted(["recommender.json", "recommender.safetensors", "items.csv", "histories.csv"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.fixture(scope="module")
def saved(trained, toy_task, tmp_path_factory):
    return save_recommender(trained[0], toy_task, tmp_path_factory.mktemp("saved") / "rec")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("args, message", [
    (["--user", "nobody"], "Unknown user 'nobody'"),
    (["--history", "999,001"], "not in the catalogue: ['999']"),
    (["--history", " , "], "--history needs item ids"),
    (["--user", "u1", "-k", "0"], "must be a whole number >= 1"),
])
def test_cli_bad_requests_fail_in_one_line(saved, capsys, args, message):
    before = _digest(saved)
    try:
        code = main(["recommend", str(saved), *args])
    except SystemExit as stop:  # argparse refuses a bad flag value itself, with the same one line and status
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _digest(saved) == before


def test_cli_answers_a_user_and_a_history(saved, capsys):
    assert main(["recommend", str(saved), "--user", "u1", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# user u1" and len(out) == 5  # header, column names, 3 items
    assert main(["recommend", str(saved), "--history", "001,002", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "histories.csv").unlink(), "lacks ['histories.csv']"),
    (lambda f: (f / "recommender.json").write_text("{broken"), "recommender.json is not valid JSON"),
    (lambda f: (f / "recommender.safetensors").write_bytes(b"\x00" * 7), ""),
])
def test_a_damaged_recommender_is_named_not_a_traceback(saved, tmp_path, capsys, damage, message):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    damage(copy)
    assert main(["recommend", str(copy), "--user", "u1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_missing_folder_and_both_or_neither_selector_are_refused(tmp_path, saved, capsys):
    assert main(["recommend", str(tmp_path / "none"), "--user", "u1"]) == 2
    assert "is not a saved recommender" in capsys.readouterr().err
    for args in (["--user", "u1", "--history", "001"], []):
        with pytest.raises(SystemExit) as stop:
            main(["recommend", str(saved), *args])
        assert stop.value.code == 2


def test_a_peers_ranked_lists_score_like_the_scores_they_came_from(trained, toy_task):
    from recbook.recommend import topk_scores
    scores = sequence_scores(trained[0], toy_task, "test")
    masked = scores.masked_fill(~toy_task.candidate_mask("test"), float("-inf"))
    top = masked.topk(5)
    users = toy_task.targets("test")["user_id"].to_numpy()
    lists = pd.DataFrame({"user_id": np.repeat(users, 5), "item_id": toy_task.items["item_id"].to_numpy()[top.indices.numpy().ravel()],
                          "rank": np.tile(np.arange(1, 6), len(users))})
    ours, theirs = (evaluate_recommendations(s, toy_task, "test", k=5) for s in (scores, topk_scores(lists, toy_task)))
    assert ours["hr@5"] == pytest.approx(theirs["hr@5"]) and ours["ndcg@5"] == pytest.approx(theirs["ndcg@5"])
    with pytest.raises(ValueError, match="does not have"):
        topk_scores(lists.assign(item_id="no-such-item"), toy_task)
