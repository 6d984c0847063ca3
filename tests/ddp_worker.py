"""Train a tiny dropout-free BERT with one of recbook's loops; run alone or under torchrun.

    python tests/ddp_worker.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

For each loop (bi: train_bi_encoder, scorer: train_scorer, distil: distill_bi_encoder), rank 0 writes
OUT_DIR/<loop>.safetensors: the trained weights, with the logged losses in its metadata.
"""
import json
import sys

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel

from recbook.compress import distill_bi_encoder
from recbook.core import world
from recbook.model import BiEncoder, CrossEncoderScorer, load_encoder, train_bi_encoder, train_scorer

WORDS = "red blue dress skirt linen wool soft tight long short summer winter jeans coat".split()


def tiny(tokenizer, seed):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config)


def main(out_dir):
    tokenizer, _ = load_encoder()
    for kind in ("bi", "scorer", "distil"):
        train(tokenizer, f"{out_dir}/{kind}.safetensors", kind)


def train(tokenizer, out, kind):
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (5,), generator=g)) for _ in range(21)]
    queries, items = [t.split()[0] + " " + t.split()[1] for t in texts], [i % 7 for i in range(21)]
    if kind == "scorer":
        model = CrossEncoderScorer(tiny(tokenizer, 0), tokenizer, max_length=16)
        losses = train_scorer(model, queries, texts, [1 + i % 5 for i in range(21)], batch_size=8, epochs=2, lr=1e-3, progress=False)
    else:
        model = BiEncoder(tiny(tokenizer, 0), tokenizer, doc_max_length=16)
        if kind == "bi":
            losses = train_bi_encoder(model, queries, texts, items, batch_size=8, epochs=2, lr=1e-3, progress=False)
        else:
            teacher = BiEncoder(tiny(tokenizer, 1), tokenizer, doc_max_length=16).eval()
            losses = distill_bi_encoder(model, teacher, queries, texts, items, batch_size=8, epochs=2, lr=1e-3, progress=False)
    if world()[0] == 0:
        initial = tiny(tokenizer, 0).state_dict()
        moved = max((v - initial[k]).abs().max().item() for k, v in model.encoder.state_dict().items())
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out,
                  metadata={"losses": json.dumps(losses), "world": str(world()[1]), "moved": str(moved)})


if __name__ == "__main__":
    main(*sys.argv[1:])
