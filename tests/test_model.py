"""Chapter 03: encoders, the two heads, saving/loading, losses, baselines' helpers and teacher caching."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from recbook.model import (PAD_MULTIPLE, BiEncoder, CrossEncoderScorer, _batches_by_length, contrastive_loss, hybrid_scores, load_encoder, load_model,
                           load_teacher, max_sim_scores, mean_pool, save_model, scoring_report, standardise_rows,
                           train_bi_encoder, train_scorer, teacher_path)


from conftest import tiny_bert


@pytest.fixture()
def tiny(tokenizer):
    return tiny_bert(tokenizer)


def test_default_encoder_loads_offline(tokenizer):
    tok, encoder = load_encoder()
    assert encoder.config.num_hidden_layers == 6 and encoder.config.hidden_size == 384


def test_load_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="Could not load an encoder"):
        load_encoder(tmp_path)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 2.0]]))


def test_encode_returns_input_order_and_unit_vectors(tiny, tokenizer):
    model = BiEncoder(tiny, tokenizer)
    texts = ["a much longer text about a summer dress " * 3, "top", "jeans that fit well"]
    together = model.encode(texts, batch_size=2)
    alone = torch.cat([model.encode([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty"):
        model.encode(["ok", ""])


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=200), batch_size=st.integers(1, 70),
       max_length=st.integers(1, 256))
def test_inference_batches_pad_each_text_by_its_own_length(lengths, batch_size, max_length):
    lengths = [min(n, max_length) for n in lengths]  # token counts after truncation
    batches = _batches_by_length(lengths, batch_size, max_length)
    assert sorted(i for idx, _ in batches for i in idx) == list(range(len(lengths)))  # every text exactly once
    for idx, padded in batches:
        assert 1 <= len(idx) <= batch_size
        for i in idx:  # the padded length is a function of the text's own length, never of its batch-mates
            assert padded == min(max_length, -(-lengths[i] // PAD_MULTIPLE) * PAD_MULTIPLE) >= lengths[i]


WORDS = "black maxi dress with long sleeves for a summer wedding in june light linen top jeans".split()


def test_a_text_gets_the_same_bits_alone_and_in_any_batch(tokenizer):
    """Bit-identical, not merely close: an int8 model turns fp32 differences of 1e-7 (from padding a
    text to a batch-mate's length) into different rounding, so a service needs exactly equal inputs."""
    model = BiEncoder(tiny_bert(tokenizer, hidden=48, layers=3, heads=4, ffn=96), tokenizer)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(80)]
    together = model.encode(texts, max_length=32, batch_size=64)
    alone = torch.cat([model.encode([t], max_length=32) for t in texts])
    assert torch.equal(together, alone)
    assert torch.equal(model.encode(texts[::-1], max_length=32, batch_size=7), together.flip(0))
    scorer = CrossEncoderScorer(tiny_bert(tokenizer, hidden=48, layers=2, heads=4, ffn=96), tokenizer)
    first = [" ".join(rng.choice(WORDS, size=3)) for _ in texts]
    pairs = scorer.score(first, texts, batch_size=64)
    assert torch.equal(pairs, torch.cat([scorer.score([f], [t]) for f, t in zip(first, texts)]))


def test_contrastive_loss_matches_cross_entropy_and_masks_duplicates():
    torch.manual_seed(0)
    logits = torch.randn(4, 4)
    torch.testing.assert_close(contrastive_loss(logits, ["a", "b", "c", "d"]), F.cross_entropy(logits, torch.arange(4)))
    masked = contrastive_loss(logits, ["a", "a", "c", "d"])
    # row 0 must not count document 1 (same item) as a negative, and vice versa
    expected_row0 = -torch.log_softmax(logits[0, [0, 2, 3]], 0)[0]
    expected_row1 = -torch.log_softmax(logits[1, [1, 2, 3]], 0)[0]
    rest = F.cross_entropy(logits[2:], torch.tensor([2, 3]), reduction="sum")
    torch.testing.assert_close(masked, (expected_row0 + expected_row1 + rest) / 4)


def test_bi_encoder_training_lowers_the_loss(tiny, tokenizer):
    model = BiEncoder(tiny, tokenizer)
    queries = ["red dress", "blue jeans", "wool sweater", "swim suit"] * 4
    docs = ["dress red summer", "jeans denim blue", "sweater wool warm", "swimsuit beach"] * 4
    items = [0, 1, 2, 3] * 4
    before = contrastive_loss(model(queries[:4], docs[:4]), items[:4]).item()
    train_bi_encoder(model, queries, docs, items, epochs=8, batch_size=4, lr=1e-3, progress=False)
    with torch.no_grad():
        after = contrastive_loss(model(queries[:4], docs[:4]), items[:4]).item()
    assert after < before


@pytest.mark.parametrize("loss", ["reward", "mse"])
def test_scorer_training_learns_the_rating_signal(tiny, tokenizer, loss):
    model = CrossEncoderScorer(tiny, tokenizer, max_length=16)
    texts = ["great great lovely"] * 16 + ["awful terrible bad"] * 16
    ratings = [5.0] * 16 + [1.0] * 16
    train_scorer(model, ["Class: Dresses"] * 32, texts, ratings, loss=loss, epochs=6, batch_size=8, lr=1e-3, progress=False)
    scores = model.score(["Class: Dresses"] * 2, ["great great lovely", "awful terrible bad"])
    assert scores[0] > scores[1]
    with pytest.raises(ValueError, match="Unknown loss"):
        train_scorer(model, ["a"], ["b"], [1.0], loss="hinge")


@pytest.mark.parametrize("kind", ["bi", "cross"])
def test_save_and_load_roundtrip(tmp_path, tiny, tokenizer, kind):
    model = BiEncoder(tiny, tokenizer, doc_max_length=64) if kind == "bi" else CrossEncoderScorer(tiny, tokenizer, max_length=64)
    with torch.no_grad():
        if kind == "cross":
            model.head.bias.fill_(0.25)
    path = save_model(model, tmp_path / "m")
    assert not list(tmp_path.glob(".m.*"))  # no temporary folder left behind
    assert (path / "encoder" / "model.safetensors").is_file()
    back = load_model(path)
    assert type(back) is type(model) and back.config() == model.config()
    if kind == "bi":
        torch.testing.assert_close(back.encode(["a dress"]), model.encode(["a dress"]))
    else:
        torch.testing.assert_close(back.score(["f"], ["a dress"]), model.score(["f"], ["a dress"]))


def test_saving_replaces_an_earlier_model_but_never_a_readers_folder(tmp_path, tiny, tokenizer):
    first, second = BiEncoder(tiny, tokenizer, doc_max_length=32), BiEncoder(tiny, tokenizer, doc_max_length=48)
    save_model(first, tmp_path / "m")
    save_model(second, tmp_path / "m")  # recbook's own folder: replaced
    assert load_model(tmp_path / "m").doc_max_length == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging or old copy left behind
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("months of work")
    with pytest.raises(FileExistsError, match="not a recbook model folder"):
        save_model(first, mine)
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"] and (mine / "chapter1.tex").read_text() == "months of work"
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        save_model(first, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    assert load_model(save_model(first, tmp_path / "empty")).doc_max_length == 32  # an empty folder holds nothing to lose


def test_load_model_rejects_non_models(tmp_path):
    with pytest.raises(ValueError, match="no recbook.json"):
        load_model(tmp_path)
    (tmp_path / "recbook.json").write_text(json.dumps({"kind": "lstm"}))
    with pytest.raises(ValueError, match="unknown model kind"):
        load_model(tmp_path)


def test_missing_teacher_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path))
    assert str(teacher_path("search")).startswith(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="recbook bench baseline"):
        load_teacher("search")


@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 6), st.integers(0, 1000))
@settings(deadline=None, max_examples=40)
def test_max_sim_is_the_best_review_per_item(n_queries, n_reviews, n_items, seed):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n_queries, 8, generator=g), dim=1)
    r = F.normalize(torch.randn(n_reviews, 8, generator=g), dim=1)
    item = torch.randint(0, n_items, (n_reviews,), generator=g)
    out = max_sim_scores(q, r, item, n_items)
    for i in range(n_queries):
        for j in range(n_items):
            sims = [float(q[i] @ r[k]) for k in range(n_reviews) if item[k] == j]
            assert out[i, j].item() == pytest.approx(max(sims) if sims else -1.0, abs=1e-6)


def test_hybrid_is_invariant_to_rescaling_each_ranker():
    torch.manual_seed(0)
    lexical, dense = torch.rand(3, 10) * 30, torch.rand(3, 10)
    torch.testing.assert_close(hybrid_scores(lexical, dense, 0.3), hybrid_scores(lexical * 7 + 2, dense * 0.1 - 5, 0.3))
    torch.testing.assert_close(hybrid_scores(lexical, dense, 1.0), standardise_rows(dense))


def test_scoring_report_on_perfect_and_reversed_scores():
    frame = pd.DataFrame({"rating": [1, 2, 3, 3, 4, 5], "recommended": [0, 0, 0, 1, 1, 1]})
    perfect = scoring_report(torch.tensor([1.0, 2, 3, 3.5, 4, 5]), frame)
    assert perfect["spearman"] == pytest.approx(1.0, abs=0.02) and perfect["recommended_auc"] == 1.0
    assert perfect["three_star_auc"] == 1.0
    reversed_ = scoring_report(-torch.tensor([1.0, 2, 3, 3.5, 4, 5]), frame)
    assert reversed_["recommended_auc"] == 0.0
