"""RecBole 1.2.1 SASRec on recbook's leave-one-out split.  Runs inside ~/.cache/recbook/peers/recbole-venv:

    python tools/peers/recbole_sasrec.py SPLIT_DIR OUT_DIR --seed 0 [--epochs 200] [--quick]

The split goes to RecBole as its "benchmark" atomic files (split.train/valid/test.inter with
item_id_list:token_seq), so RecBole never re-sorts or re-splits anything: every training row is a
prefix of a user's train sequence in `position` order (up to 50 items) and its next item, exactly
RecBole's own data augmentation; valid rows are (train history -> valid item); test rows are
(train + valid history -> test item).

Training uses RecBole's Trainer._train_epoch; after each epoch the runner scores valid with
seen items masked (recbook's protocol) and early-stops on that NDCG@10 (patience 10), keeping the
best weights in memory. RecBole's own valid NDCG@10 (which does not mask seen items for sequential
models) is recorded too.
"""
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402



def patch_recbole():
    """Compatibility patches, applied at import, for recbole 1.2.1 with torch 2.13 / numpy 1.26.
    - torch>=2.6 defaults torch.load(weights_only=True); RecBole's checkpoints hold a Config object, so
      Trainer.evaluate(load_best_model=True) / resume would fail. This runner keeps the best weights in
      memory and never calls torch.load, but the patch is kept so any RecBole loading path works.
    numpy<2 is pinned in setup.sh (RecBole uses np.float_); recbole itself already aliases np.bool."""
    import recbole.trainer.trainer as rt
    orig = torch.load

    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return orig(*args, **kwargs)

    rt.torch.load = load  # module attribute is the torch module: patch is process-wide but only here


def write_atomic_files(folder: Path, proto: dict):
    "RecBole benchmark files: user_id:token, item_id_list:token_seq, item_id:token (space-separated lists)."
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    train_lines = []
    for user, seq in proto["train"].items():
        for t in range(1, len(seq)):
            train_lines.append(f"{user}\t{' '.join(seq[max(0, t - pc.MAX_LEN):t])}\t{seq[t]}\n")
    files = {"train": train_lines}
    for split in ("valid", "test"):
        hist, target = proto[split]["history"], proto[split]["target"]
        files[split] = [f"{u}\t{' '.join(hist[u][-pc.MAX_LEN:])}\t{target[u]}\n" for u in target if hist[u]]
    for split, lines in files.items():
        (folder / f"split.{split}.inter").write_text(header + "".join(lines))
    return {k: len(v) for k, v in files.items()}


def main(argv=None):
    a = pc.runner_arguments(__doc__, argv)
    torch.set_num_threads(a.threads)
    epochs = a.epochs or (3 if a.quick else 200)
    out_dir = a.out_dir.resolve()
    split = pc.read_split(a.split_dir)
    proto = pc.protocol(split)

    patch_recbole()
    import logging
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.data.interaction import Interaction
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    work = Path(tempfile.mkdtemp(prefix="recbole-sasrec-"))
    (work / "split").mkdir()
    n_rows = write_atomic_files(work / "split", proto)
    os.chdir(work)  # RecBole writes log_tensorboard/ and saved/ under the working directory
    hyper = {"hidden_size": 64, "inner_size": 64, "n_layers": 2, "n_heads": 2,
             "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "hidden_act": "relu",
             "layer_norm_eps": 1e-12, "initializer_range": 0.02, "loss_type": "CE",
             "MAX_ITEM_LIST_LENGTH": pc.MAX_LEN, "learning_rate": 1e-3, "train_batch_size": 256,
             "weight_decay": 0.0, "learner": "adam"}
    sys.argv = sys.argv[:1]  # RecBole's Config also parses --key=value from the command line
    config = Config(model="SASRec", dataset="split", config_dict={
        **hyper, "data_path": str(work), "benchmark_filename": ["train", "valid", "test"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": None,
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]}, "alias_of_item_id": ["item_id_list"],
        "train_neg_sample_args": None, "epochs": epochs, "stopping_step": a.patience,
        "eval_args": {"group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10", "eval_batch_size": 4096,
        "seed": a.seed, "reproducibility": True, "use_gpu": False, "device": "cpu", "show_progress": False,
        "state": "WARNING", "checkpoint_dir": str(work / "saved"), "worker": 0})
    logging.getLogger().setLevel(logging.WARNING)
    init_seed(a.seed, True)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(a.seed, True)
    model = SASRec(config, train_data.dataset).to("cpu")
    trainer = Trainer(config, model)

    item_tok2id = dataset.field2token_id["item_id"]
    n_items = dataset.item_num  # includes the padding id 0
    catalogue = [i for i in split["items"] if i in item_tok2id]
    not_rankable = len(split["items"]) - len(catalogue)
    id2tok = dataset.field2id_token["item_id"]
    in_catalogue = np.zeros(n_items, dtype=bool)
    in_catalogue[[item_tok2id[i] for i in catalogue]] = True

    def batch_of(users, hist):
        seqs = [[item_tok2id[i] for i in hist[u] if i in item_tok2id] for u in users]
        lens = [max(1, min(len(s), pc.MAX_LEN)) for s in seqs]
        x = torch.zeros(len(users), pc.MAX_LEN, dtype=torch.long)
        for r, s in enumerate(seqs):  # RecBole layout: oldest first, right-padded with 0
            s = s[-pc.MAX_LEN:]
            x[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        return Interaction({"item_id_list": x, "item_length": torch.tensor(lens, dtype=torch.long)}), seqs

    @torch.no_grad()
    def rank(users, hist, k):
        "user -> [(item token, score)] top-k, the padding id, non-catalogue and seen items excluded."
        model.eval()
        out = {}
        for start in range(0, len(users), 512):
            chunk = users[start:start + 512]
            inter, seqs = batch_of(chunk, hist)
            scores = model.full_sort_predict(inter).view(len(chunk), -1)
            scores[:, ~torch.from_numpy(in_catalogue)] = -torch.inf
            for r, s in enumerate(seqs):
                scores[r, s] = -torch.inf
            top = torch.topk(scores, k, dim=1)
            for r, u in enumerate(chunk):
                out[u] = [(id2tok[j], float(v)) for v, j in zip(top.values[r].tolist(), top.indices[r].tolist())
                          if v > -torch.inf]
        return out

    valid_users = list(proto["valid"]["target"])
    stopper = pc.EarlyStop(a.patience)
    lib_valid = []
    t0 = time.perf_counter()
    epochs_run = 0
    stopped_by = "max epochs"
    for epoch in range(epochs):
        model.train()
        loss = trainer._train_epoch(train_data, epoch, show_progress=False)
        epochs_run = epoch + 1
        ranked = rank(valid_users, proto["valid"]["history"], 10)
        ndcg, hr = pc.ndcg_hr_at_k({u: [i for i, _ in r] for u, r in ranked.items()}, proto["valid"]["target"])
        lib_score, lib_result = trainer._valid_epoch(valid_data, show_progress=False)
        lib_valid.append(float(lib_result["ndcg@10"]))
        print(f"epoch {epoch:3d} loss {float(loss):.2f} valid ndcg@10 {ndcg:.4f} hr@10 {hr:.4f} "
              f"(recbole unmasked ndcg@10 {lib_valid[-1]:.4f}) {time.perf_counter() - t0:.0f}s", flush=True)
        if stopper.step(epoch, ndcg, lambda: copy.deepcopy(model.state_dict())):
            stopped_by = f"early stop (patience {a.patience})"
            break
        if a.time_limit and time.perf_counter() - t0 > a.time_limit:
            stopped_by = f"time limit {a.time_limit:.0f}s"
            break
    train_seconds = time.perf_counter() - t0
    model.load_state_dict(stopper.state)

    test_users = list(proto["test"]["target"])
    ranked = rank(test_users, proto["test"]["history"], pc.TOPK)
    pc.write_topk(out_dir / "topk.csv", [(u, i, n + 1, s) for u in test_users for n, (i, s) in enumerate(ranked[u])])
    ranked_v = rank(valid_users, proto["valid"]["history"], pc.TOPK)
    pc.write_topk(out_dir / "valid_topk.csv",
                  [(u, i, n + 1, s) for u in valid_users for n, (i, s) in enumerate(ranked_v[u])])
    test_ndcg, test_hr = pc.ndcg_hr_at_k({u: [i for i, _ in r] for u, r in ranked.items()}, proto["test"]["target"])
    ms = pc.median_ms(lambda u: rank([u], proto["test"]["history"], 10), test_users[:110], warmup=10)

    pc.write_meta(out_dir, {
        "library": "recbole", "version": recbole.__version__, "model": "SASRec", "loss": "CE (full softmax)",
        "seed": a.seed, "epochs_run": epochs_run, "stopped_by": stopped_by, "best_epoch": stopper.best_epoch + 1,
        "train_seconds": round(train_seconds, 2), "ms_per_user": round(ms, 3),
        "hyperparameters": {**hyper, "max_epochs": epochs, "patience": a.patience},
        "valid_ndcg10_best": round(stopper.best, 5),
        "valid_ndcg10_recbole_unmasked_at_best": round(lib_valid[stopper.best_epoch], 5),
        "test_ndcg10_runner": round(test_ndcg, 5), "test_hr10_runner": round(test_hr, 5),
        "torch": torch.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
        "quick": a.quick, "rows": n_rows, "items_not_rankable": not_rankable,
        "notes": "valid_ndcg10_best: this runner's valid NDCG@10 with seen items masked (the early-stop metric). "
                 "RecBole's own full-sort evaluation of sequential models does not mask seen items, so its "
                 "number (valid_ndcg10_recbole_unmasked_at_best) is lower. ms_per_user: one user per call, "
                 "full-catalogue scores + mask + top-10, median over 100 test users after 10 warm-up calls."})
    print(f"test ndcg@10 {test_ndcg:.4f} hr@10 {test_hr:.4f}; wrote {out_dir}/topk.csv, meta.json")


if __name__ == "__main__":
    main()
