"""RecTools 0.19 SASRecModel on recbook's leave-one-out split.  Runs inside ~/.cache/recbook/peers/rectools-venv:

    python tools/peers/rectools_sasrec.py SPLIT_DIR OUT_DIR --seed 0 [--epochs 200] [--quick]

The model is fitted on train.csv only. RecTools orders each user's interactions by its Datetime
column (stable sort); the runner passes recbook's `position` as that column (one second per step),
so sequences follow recbook's tie-broken order, never the raw timestamps.
RecTools trains SASRec the way its authors do: one sequence per user (the last 50 + 1 items),
shifted-sequence targets at every position, full softmax loss over the catalogue.

Early stopping: a Lightning callback, after every epoch, asks the model itself for valid
recommendations (`model.recommend(valid users, train dataset, k=10, filter_viewed=True)`) and
computes NDCG@10 (seen items excluded, recbook's protocol); patience 10; the best weights are kept
in memory and restored. Test: `model.recommend(test users, train+valid dataset, k=100, filter_viewed=True)`.
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402



def to_rectools(frame: pd.DataFrame) -> pd.DataFrame:
    from rectools import Columns
    return pd.DataFrame({Columns.User: frame["user_id"].to_numpy(), Columns.Item: frame["item_id"].to_numpy(),
                         Columns.Weight: 1.0,
                         Columns.Datetime: pd.to_datetime(frame["position"].to_numpy(dtype=np.int64), unit="s")})


def main(argv=None):
    a = pc.runner_arguments(__doc__, argv)
    torch.set_num_threads(a.threads)
    epochs = a.epochs or (3 if a.quick else 200)
    out_dir = a.out_dir.resolve()
    split = pc.read_split(a.split_dir)
    proto = pc.protocol(split)

    import logging
    import warnings
    import rectools
    from lightning_fabric import seed_everything
    from pytorch_lightning import Callback, Trainer
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel
    from rectools.models.nn.item_net import IdEmbeddingsItemNet

    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    train_ds = Dataset.construct(to_rectools(split["train"]))
    both = pd.concat([split["train"], split["valid"]]).sort_values("position", kind="stable")
    test_ds = Dataset.construct(to_rectools(both))
    valid_users = list(proto["valid"]["target"])
    test_users = list(proto["test"]["target"])
    stopper = pc.EarlyStop(a.patience)
    log = {"epochs_run": 0, "stopped_by": "max epochs"}
    model_box = {}

    def recommend(users, dataset, k):
        reco = model_box["m"].recommend(users, dataset, k=k, filter_viewed=True, on_unsupported_targets="warn")
        reco = reco.sort_values([Columns.User, Columns.Rank], kind="stable")
        return {u: list(zip(g[Columns.Item], g[Columns.Score])) for u, g in reco.groupby(Columns.User, sort=False)}

    class ValidNDCG(Callback):
        "After each epoch: valid NDCG@10 through the model's own recommend(); early stop; keep best weights."

        def on_train_epoch_end(self, trainer, pl_module):
            model = model_box["m"]
            log["epochs_run"] = trainer.current_epoch + 1
            was_fitted, model.is_fitted = model.is_fitted, True  # recommend() refuses an unfitted model
            try:
                ranked = recommend(valid_users, train_ds, 10)
            finally:
                model.is_fitted = was_fitted
                pl_module.torch_model.train()
            ndcg, hr = pc.ndcg_hr_at_k({u: [i for i, _ in r] for u, r in ranked.items()}, proto["valid"]["target"])
            loss = trainer.callback_metrics.get("train_loss")
            print(f"epoch {trainer.current_epoch:3d} loss {float(loss) if loss is not None else float('nan'):.3f} "
                  f"valid ndcg@10 {ndcg:.4f} hr@10 {hr:.4f} {time.perf_counter() - t0:.0f}s", flush=True)
            if stopper.step(trainer.current_epoch, ndcg,
                            lambda: copy.deepcopy(pl_module.torch_model.state_dict())):
                log["stopped_by"] = f"early stop (patience {a.patience})"
                trainer.should_stop = True
            elif a.time_limit and time.perf_counter() - t0 > a.time_limit:
                log["stopped_by"] = f"time limit {a.time_limit:.0f}s"
                trainer.should_stop = True

    def get_trainer():
        return Trainer(max_epochs=epochs, min_epochs=1, deterministic=True, enable_progress_bar=False,
                       enable_model_summary=False, logger=False, enable_checkpointing=False,
                       accelerator="cpu", devices=1, callbacks=[ValidNDCG()])

    hyper = {"n_factors": 64, "n_blocks": 2, "n_heads": 2, "dropout_rate": 0.2, "session_max_len": pc.MAX_LEN,
             "loss": "softmax", "lr": 1e-3, "batch_size": 128, "use_pos_emb": True, "use_causal_attn": True,
             "use_key_padding_mask": False, "item_net_block_types": "IdEmbeddingsItemNet",
             "train_min_user_interactions": 2}
    seed_everything(a.seed, workers=True)
    model = SASRecModel(
        n_factors=64, n_blocks=2, n_heads=2, dropout_rate=0.2, session_max_len=pc.MAX_LEN, loss="softmax",
        lr=1e-3, batch_size=128, epochs=epochs, deterministic=True, verbose=0,
        item_net_block_types=(IdEmbeddingsItemNet,), get_trainer_func=get_trainer,
        recommend_torch_device="cpu", recommend_batch_size=256)
    model_box["m"] = model
    t0 = time.perf_counter()
    model.fit(train_ds)
    train_seconds = time.perf_counter() - t0
    model.lightning_model.torch_model.load_state_dict(stopper.state)

    ranked = recommend(test_users, test_ds, pc.TOPK)
    pc.write_topk(out_dir / "topk.csv", [(u, i, n + 1, s) for u in test_users for n, (i, s) in enumerate(ranked.get(u, []))])
    ranked_v = recommend(valid_users, train_ds, pc.TOPK)
    pc.write_topk(out_dir / "valid_topk.csv",
                  [(u, i, n + 1, s) for u in valid_users for n, (i, s) in enumerate(ranked_v.get(u, []))])
    test_ndcg, test_hr = pc.ndcg_hr_at_k({u: [i for i, _ in r] for u, r in ranked.items()}, proto["test"]["target"])
    ms = pc.median_ms(lambda u: recommend([u], test_ds, 10), test_users[:110], warmup=10)
    known = set(model.data_preparator.get_known_item_ids())

    pc.write_meta(out_dir, {
        "library": "rectools", "version": rectools.__version__, "model": "SASRecModel", "loss": "softmax (full)",
        "seed": a.seed, "epochs_run": log["epochs_run"], "stopped_by": log["stopped_by"], "best_epoch": stopper.best_epoch + 1,
        "train_seconds": round(train_seconds, 2), "ms_per_user": round(ms, 3),
        "hyperparameters": {**hyper, "max_epochs": epochs, "patience": a.patience, "adam_betas": [0.9, 0.98]},
        "valid_ndcg10_best": round(stopper.best, 5),
        "test_ndcg10_runner": round(test_ndcg, 5), "test_hr10_runner": round(test_hr, 5),
        "torch": torch.__version__, "numpy": np.__version__, "pandas": pd.__version__,
        "torch_threads": torch.get_num_threads(), "quick": a.quick,
        "items_not_rankable": len(set(split["items"]) - known),
        "notes": "valid_ndcg10_best: valid NDCG@10 of model.recommend(filter_viewed=True), the early-stop metric "
                 "(RecTools itself only reports a validation loss). train_seconds includes the per-epoch valid "
                 "recommend. Items absent from train.csv are unknown to the model and never recommended. "
                 "ms_per_user: model.recommend for one user, k=10, median over 100 test users after 10 warm-up calls."})
    print(f"test ndcg@10 {test_ndcg:.4f} hr@10 {test_hr:.4f}; wrote {out_dir}/topk.csv, meta.json")


if __name__ == "__main__":
    main()
