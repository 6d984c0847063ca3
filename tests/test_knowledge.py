"""Chapter 07: the knowledge graph, query understanding, TransE, the gate, rules, cold start and the ranker."""
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from recbook.data import build_search_task, from_table
from recbook.knowledge import (FILTERED, GatedFusion, KnowledgeGraph, KnowledgeRanker, Rule, TinyWordNet, TransE,
                               apply_rules, attribute_lexicon, catalogue_triples, cold_start_task, corrupt, expand_query,
                               item_facts, knowledge_graph, margin_loss, mine_attribute_terms, query_attributes,
                               rare_values, related_words, slice_report, summarise, tail_ranks, train_gate, train_transe,
                               wordnet_triples, with_query_facts)
from recbook.metrics import ndcg_at_k
from recbook.model import BiEncoder

from conftest import tiny_bert

WN = TinyWordNet({"dress": (["dress", "frock"], ["garment"]), "sundress": (["sundress"], ["dress"]),
                  "frock": (["dress", "frock"], ["garment"]), "jean": (["jean", "denim"], ["trousers"]),
                  "skirt": (["skirt"], ["garment"])},
                 plurals={"dresses": "dress", "jeans": "jean", "skirts": "skirt"})

KINDS = {"Dresses": ("Dresses", "summer dress with lace"), "Jeans": ("Bottoms", "stretch denim jeans"),
         "Skirts": ("Bottoms", "flowy skirt with pleats")}


def synthetic_task(items_per_class=4, reviews=10):
    "A small search task: three classes, every item with `reviews` reviews whose titles name the garment."
    rows = []
    for k, (cls, (dept, text)) in enumerate(KINDS.items()):
        for i in range(items_per_class):
            item = 100 * k + i
            for r in range(reviews):
                rows.append({"user": len(rows), "item": item, "rating": 5, "class": cls, "dept": dept,
                             "text": f"{text} number {item} review {r} colour{item}", "title": f"my {text.split()[-1]} {r}"})
    inter = from_table(pd.DataFrame(rows), user="user", item="item", rating="rating", text="text", query="title",
                       item_features=["class", "dept"])
    return build_search_task(inter)


@pytest.fixture(scope="module")
def task():
    return synthetic_task()


# ---- the graph ------------------------------------------------------------------------------------------------

def test_graph_validates_dedupes_and_indexes():
    with pytest.raises(ValueError, match="three non-empty strings"):
        KnowledgeGraph([("a", "", "b")])
    g = KnowledgeGraph([("a", "r", "b"), ("a", "r", "b"), ("b", "s", "c"), ("a", "r", "c")])
    assert len(g) == 3 and g.relations == ["r", "s"] and g.entities == ["a", "b", "c"]
    triples, entity_id, relation_id = g.index()
    names = {i: e for e, i in entity_id.items()}, {i: r for r, i in relation_id.items()}
    decoded = {(names[0][h], names[1][r], names[0][t]) for h, r, t in triples.tolist()}
    assert decoded == set(g.triples.itertuples(index=False))
    assert sorted(g.tails("a", "r")) == ["b", "c"] and g.heads("c", "s") == ["b"] and g.tails("z", "r") == []
    assert len(g.where(["s"])) == 1
    assert len(g.neighbourhood(["a"], 1)) == 2 and len(g.neighbourhood(["a"], 2)) == 3
    assert len(g + KnowledgeGraph([("c", "r", "d")])) == 4


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2)), min_size=1, max_size=12))
def test_subclass_edges_exist_exactly_when_the_hierarchy_is_functional(pairs):
    items = pd.DataFrame({"item_id": range(len(pairs)), "fine": [f"f{a}" for a, _ in pairs], "coarse": [f"c{b}" for _, b in pairs]})
    triples = catalogue_triples(items, ["fine", "coarse"])
    functional = items.groupby("fine")["coarse"].nunique().max() == 1
    subclass = [t for t in triples if t[1] == "subclass of"]
    assert bool(subclass) == functional
    assert len(triples) - len(subclass) == 2 * len(items)  # one edge per item and attribute
    if functional:
        assert len(subclass) == items["fine"].nunique()


def test_catalogue_triples_names_missing_columns():
    with pytest.raises(ValueError, match="colour"):
        catalogue_triples(pd.DataFrame({"item_id": [1]}), ["colour"])


def test_mined_terms_are_distinctive_and_bounded():
    reviews = pd.DataFrame({"item_id": [1, 1, 2, 2, 3, 4],
                            "text": ["lace love lace", "lace love", "denim love", "denim", "linen love", "wool love"]})
    terms = mine_attribute_terms(reviews, top_k=1, min_items=1, max_item_fraction=0.5)
    assert dict(zip(terms["item_id"], terms["term"])) == {1: "lace", 2: "denim", 3: "linen", 4: "wool"}
    assert "love" not in set(mine_attribute_terms(reviews, top_k=5, min_items=1, max_item_fraction=0.5)["term"])
    assert mine_attribute_terms(reviews, top_k=2, min_items=1, max_item_fraction=0.5).groupby("item_id").size().max() <= 2
    assert mine_attribute_terms(reviews.iloc[:0]).empty
    with pytest.raises(ValueError, match="top_k"):
        mine_attribute_terms(reviews, top_k=0)


def test_wordnet_edges_expansion_and_attribute_detection():
    triples = wordnet_triples(["dresses", "sundress", "jeans", "unknown"], WN)
    assert ("word:dresses", "lemma", "word:dress") in triples
    assert ("word:dress", "synonym", "word:frock") in triples
    assert ("word:sundress", "hypernym", "word:dress") in triples
    assert not any("unknown" in t[0] for t in triples)
    g = KnowledgeGraph(triples)
    assert related_words("dresses", g) == ["dress", "frock"]
    assert expand_query("two dresses", g) == "two dresses dress frock"
    assert expand_query("two dresses", g, vocabulary={"frock"}) == "two dresses frock"
    assert expand_query("plain words", g) == "plain words"
    items = pd.DataFrame({"item_id": [1, 2], "class": ["Dresses", "Jeans"], "dept": ["Dresses", "Bottoms"]})
    lexicon = attribute_lexicon(items, ["class", "dept"], g)
    assert query_attributes("a cute sundress", lexicon, g) == {"class": {"Dresses"}, "dept": {"Dresses"}}
    assert query_attributes("a cute sundress", lexicon) == {}  # without the graph, no hypernym to follow
    assert query_attributes("faded jeans", lexicon, g) == {"class": {"Jeans"}}
    assert with_query_facts(["faded jeans"], lexicon, g) == ["faded jeans (class: Jeans)"]


def test_real_wordnet_if_prepared():
    from recbook.data import wordnet, wordnet_dir
    if not (wordnet_dir() / "corpora" / "wordnet" / "data.noun").is_file():
        pytest.skip("WordNet is not prepared (recbook setup wordnet)")
    g = KnowledgeGraph(wordnet_triples(["dresses", "sundress"], wordnet()))
    assert "dress" in related_words("dresses", g)
    assert "dress" in related_words("sundress", g, ("hypernym",))


def test_graph_of_a_task_and_item_facts(task):
    graph = knowledge_graph(task, WN, top_k=2, min_items=1, max_item_fraction=0.5)
    rels = set(graph.relations)
    assert {"has class", "has dept", "subclass of", "mentions", "lemma"} <= rels
    assert ("class=Jeans", "subclass of", "dept=Bottoms") in set(graph.triples.itertuples(index=False))
    facts = item_facts(0, graph, ["class", "dept"])
    assert "mentions" in facts and "Dresses is a kind of garment" in facts


# ---- TransE ---------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1, 2]))
def test_transe_score_is_the_negative_translation_distance_and_translation_invariant(seed, p):
    torch.manual_seed(seed)
    model = TransE(7, 3, dim=5, p=p)
    triples = torch.stack([torch.randint(7, (6,)), torch.randint(3, (6,)), torch.randint(7, (6,))], 1)
    e, r = model.entities.weight, model.relations.weight
    direct = -torch.linalg.vector_norm(e[triples[:, 0]] + r[triples[:, 1]] - e[triples[:, 2]], ord=p, dim=-1)
    torch.testing.assert_close(model(triples), direct)
    assert (model(triples) <= 0).all()
    before = model(triples)
    with torch.no_grad():
        model.entities.weight.add_(torch.randn(5))  # the same shift for every entity
    torch.testing.assert_close(model(triples), before, atol=1e-5, rtol=1e-5)


def test_transe_score_is_zero_for_an_exact_translation():
    model = TransE(2, 1, dim=3)
    with torch.no_grad():
        model.entities.weight[1] = model.entities.weight[0] + model.relations.weight[0]
    assert model(torch.tensor([[0, 0, 1]])).abs().item() < 1e-6


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 5), min_size=1, max_size=8), st.floats(0, 3))
def test_margin_loss_matches_torch(distances, margin):
    pos = torch.tensor(distances)
    neg = pos.flip(0) + 0.3
    torch.testing.assert_close(margin_loss(pos, neg, margin), F.margin_ranking_loss(neg, pos, torch.ones_like(pos), margin=margin))


def test_corrupt_changes_only_one_end_and_never_the_relation():
    triples = torch.tensor([[0, 0, 1]] * 200)
    bad = corrupt(triples, 50, torch.Generator().manual_seed(0))
    assert torch.equal(bad[:, 1], triples[:, 1])
    assert ((bad[:, 0] == 0) | (bad[:, 2] == 1)).all()
    assert 50 < (bad[:, 0] != 0).sum() < 150  # about half the heads are replaced


def test_transe_learns_a_tiny_graph_and_tail_ranks_match_brute_force():
    g = KnowledgeGraph([(f"i{i}", "in", f"c{i % 3}") for i in range(12)] + [(f"c{c}", "under", f"d{c % 2}") for c in range(3)])
    model, entity_id, losses = train_transe(g, dim=16, epochs=150, batch_size=8, lr=0.02, progress=False)
    triples = g.index()[0]
    ranks = tail_ranks(model, triples)
    assert losses[-1] < losses[0] / 4 and ranks.float().mean() < 2
    e, r = model.entities.weight.detach(), model.relations.weight.detach()
    h, rel, t = triples[0]
    d = (e[h] + r[rel] - e).abs().sum(-1)
    assert ranks[0] == (d <= d[t]).sum()
    with pytest.raises(ValueError, match="empty"):
        train_transe(KnowledgeGraph(), progress=False)
    with pytest.raises(ValueError, match="p in"):
        TransE(3, 1, p=3)


# ---- the gate -------------------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000))
def test_gate_limits_and_unit_norm(seed):
    torch.manual_seed(seed)
    text, kg = F.normalize(torch.randn(5, 8), dim=-1), torch.randn(5, 3)
    closed, opened = GatedFusion(8, 3, closed_bias=-60.0), GatedFusion(8, 3, closed_bias=60.0)
    torch.testing.assert_close(closed(text, kg), text, atol=1e-5, rtol=0)
    torch.testing.assert_close(opened(text, kg), F.normalize(opened.project(kg), dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(GatedFusion(8, 3)(text, kg).norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)


def test_gate_opens_when_the_graph_knows_what_the_text_does_not():
    torch.manual_seed(0)
    n = 12
    text = F.normalize(torch.randn(n, 16), dim=-1)            # item text vectors
    kg = torch.eye(n)                                           # the graph identifies each item
    targets = torch.arange(n).repeat(8)
    queries = F.normalize(torch.randn(n, 16), dim=-1)[targets]  # queries unrelated to the text vectors
    fusion = GatedFusion(16, n)
    gate_before = fusion.gates(text, kg).mean().item()
    losses = train_gate(fusion, queries, targets, text, kg, epochs=60, batch_size=32, lr=1e-2, progress=False)
    assert losses[-1] < losses[0] / 2
    assert fusion.gates(text, kg).mean().item() > gate_before
    with pytest.raises(ValueError, match="differ in length"):
        train_gate(fusion, queries[:3], targets, text, kg, progress=False)


# ---- rules ----------------------------------------------------------------------------------------------------

ITEMS = pd.DataFrame({"item_id": range(6), "class": ["A", "A", "B", "B", "C", "C"], "stock": [1, 0, 1, 1, 0, 1]})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=6, max_size=6), st.sampled_from(["A", "B", "C"]), st.floats(0.1, 3))
def test_rules_filter_below_everything_and_boosts_keep_order_within_groups(scores, named_class, weight):
    s = torch.tensor([scores])
    named = [{"class": {named_class}}]
    out = apply_rules(s, ITEMS, [Rule("stock", "filter", "stock", 1), Rule("named", "boost", "class", weight=weight)], named)
    kept, boosted = torch.tensor(ITEMS["stock"].to_numpy() == 1), torch.tensor(ITEMS["class"].to_numpy() == named_class)
    assert (out[0, ~kept] == FILTERED).all() and (out[0, kept] > FILTERED).all()
    for group in (kept & boosted, kept & ~boosted):  # a boost moves a whole group together: its order is kept,
        before, after = s[0, group], out[0, group]   # though two scores may round to one float (a tie, never a swap)
        lower = before[:, None] < before[None, :]
        assert (after[:, None] <= after[None, :])[lower].all()
    boost_only = apply_rules(s, ITEMS, [Rule("named", "boost", "class", weight=weight)], named)
    base = (s - s.mean()) / s.std().clamp(min=1e-6)
    torch.testing.assert_close(boost_only - base, weight * boosted[None].float(), atol=1e-4, rtol=0)


def test_rules_do_nothing_when_the_query_names_nothing_and_check_their_input():
    s = torch.tensor([[0.3, 0.1, 0.9, 0.2, 0.5, 0.4]])
    out = apply_rules(s, ITEMS, [Rule("only named", "filter", "class")], [{}])
    torch.testing.assert_close(out, s)
    filtered = apply_rules(s, ITEMS, [Rule("only named", "filter", "class")], [{"class": {"A"}}])
    assert (filtered[0, 2:] == FILTERED).all() and torch.equal(filtered[0, :2], s[0, :2])
    with pytest.raises(ValueError, match="kind must be"):
        Rule("x", "promote", "class")
    with pytest.raises(ValueError, match="finite"):
        Rule("x", "boost", "class", weight=float("nan"))
    with pytest.raises(ValueError, match="lacks"):
        apply_rules(s, ITEMS, [Rule("x", "boost", "colour")], [{}])
    with pytest.raises(ValueError, match="queries, items"):
        apply_rules(s[:, :3], ITEMS, [], [{}])


# ---- cold start, slices ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 1, 2])
def test_cold_start_keeps_test_queries_and_restricts_training_data(task, keep):
    cold_task, cold = cold_start_task(task, fraction=0.5, keep_reviews=keep, seed=3)
    assert len(cold) == round(0.5 * len(task.items))
    for split in ("valid", "test"):
        pd.testing.assert_frame_equal(cold_task.queries[split], task.queries[split])
    counts = cold_task.reviews.groupby("item_id").size()
    for item in task.items["item_id"]:
        n = int(counts.get(item, 0))
        if item in cold:
            assert n == keep
        else:
            assert n == int((task.reviews["item_id"] == item).sum())
    docs = dict(zip(cold_task.items["item_id"], cold_task.items["document"]))
    old = dict(zip(task.items["item_id"], task.items["document"]))
    assert all(docs[i] == old[i] for i in old if i not in cold)
    train = cold_task.queries["train"]
    assert set(train["interaction"]) <= set(task.queries["train"]["interaction"])
    kept = set(cold_task.reviews["interaction"])
    assert train[train["item_id"].isin(cold)]["interaction"].isin(kept).all()
    with pytest.raises(ValueError, match="fraction"):
        cold_start_task(task, fraction=2)


def test_rare_values_and_slice_report():
    assert rare_values(ITEMS.assign(c=["A", "A", "A", "B", "B", "C"]), "c", 2) == {"B", "C"}
    torch.manual_seed(0)
    scores, rel = torch.randn(5, 8), torch.zeros(5, 8)
    rel[torch.arange(5), torch.arange(5)] = 2
    rows = np.array([True, False, True, True, False])
    report = slice_report(scores, rel, {"all": np.ones(5, bool), "some": rows})
    assert report["some"]["queries"] == 3
    assert report["some"]["ndcg@10"] == pytest.approx(float(ndcg_at_k(scores[rows], rel[rows], 10).mean()))
    with pytest.raises(ValueError, match="no query"):
        slice_report(scores, rel, {"none": np.zeros(5, bool)})


def test_summarise_gives_mean_and_spread():
    runs = {"m": [{"overall": {"ndcg@10": 0.2, "queries": 3}}, {"overall": {"ndcg@10": 0.4, "queries": 3}}]}
    table = summarise(runs)
    assert table.loc["m", "overall ndcg@10"] == pytest.approx(0.3)
    assert table.loc["m", "overall ndcg@10 std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))


# ---- the ranker -----------------------------------------------------------------------------------------------

def test_knowledge_ranker_switches(task, tokenizer):
    model = BiEncoder(tiny_bert(tokenizer, hidden=32), tokenizer, doc_max_length=48)
    graph = knowledge_graph(task, WN, top_k=2, min_items=1, max_item_fraction=0.5)
    features = task.item_features
    queries = ["my skirts", "my jeans", "pleats"]
    plain = KnowledgeRanker(model, task.items, graph, features)
    assert plain.score(queries).shape == (3, len(task.items))
    facts = KnowledgeRanker(model, task.items, graph, features, facts=True)
    assert all(d.endswith(o) and d != o for d, o in zip(facts.documents(), plain.documents()))
    assert facts.query_texts(queries)[1] == "my jeans (class: Jeans)"
    ruled = KnowledgeRanker(model, task.items, graph, features, rules=[Rule("class", "filter", "class")],
                            item_text_embeddings=plain.item_text_embeddings)
    scores = ruled.score(queries)
    jeans = torch.tensor((task.items["class"] == "Jeans").to_numpy())
    assert (scores[1, ~jeans] == FILTERED).all() and (scores[2] > FILTERED).all()  # "pleats" names no class
    transe, entity_id, _ = train_transe(graph.neighbourhood([f"item:{i}" for i in task.items["item_id"]], 1),
                                        dim=8, epochs=3, progress=False)
    gated = KnowledgeRanker(model, task.items, graph, features, item_text_embeddings=plain.item_text_embeddings)
    train_q = task.split("train")
    losses = gated.fit_gate(transe, entity_id, train_q["query"].tolist(), train_q["item_id"].tolist(), epochs=3)
    assert len(losses) == 3 and gated.score(queries).shape == (3, len(task.items))
    with pytest.raises(ValueError, match="not in the catalogue"):
        gated.fit_gate(transe, entity_id, ["q"], [999999])


def test_knowledge_rows_round_trip_through_the_bench_json(tmp_path):
    from recbook.core import LatencyStats, load_results, save_results
    from recbook.knowledge import knowledge_rows
    run = lambda x: {"overall": {"ndcg@10": x, "queries": 5}, "cold-start": {"ndcg@10": x / 2, "queries": 2}}
    latency = LatencyStats.from_samples([0.01, 0.02, 0.03], 32, torch.device("cpu"))
    rows = knowledge_rows({"per_seed": {"plain": [run(0.4), run(0.6)]}, "latency": {"plain": latency}})
    path = save_results(tmp_path / "knowledge.json", rows, chapter="07_knowledge")
    loaded, rest = load_results(path)
    assert loaded[0].name == "plain" and loaded[0].metrics["overall ndcg@10"] == pytest.approx(0.5)
    assert loaded[0].metrics["cold-start ndcg@10 std"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    assert loaded[0].latency.p50_ms == pytest.approx(20.0) and "machine" in rest
