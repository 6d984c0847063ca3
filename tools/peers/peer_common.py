"""Shared by the peer runners (imported inside each peer's own venv; needs only numpy and pandas).

Reads a split folder written by `RecommendationTask.save`, orders every user's history by `position`
(recbook's tie-broken time order, never by timestamp), and writes top-k tables and meta.json
atomically. Seen items are excluded from every ranking, as recbook's evaluation does.
"""
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

MAX_LEN = 50  # SASRec maximum sequence length, the same for every peer
TOPK = 100    # items written per user


def read_split(folder) -> dict:
    "train/valid/test frames sorted by position; ids as str; the catalogue from items.csv."
    folder = Path(folder)
    ids = {"user_id": str, "item_id": str}
    out = {}
    for part in ("train", "valid", "test"):
        frame = pd.read_csv(folder / f"{part}.csv", dtype=ids)
        out[part] = frame.sort_values("position", kind="stable").reset_index(drop=True)
    out["items"] = pd.read_csv(folder / "items.csv", dtype={"item_id": str})["item_id"].tolist()
    out["task"] = json.loads((folder / "task.json").read_text())
    return out


def sequences(frame: pd.DataFrame) -> dict:
    "user -> list of item ids in position order (frame must already be sorted by position)."
    return {u: g.tolist() for u, g in frame.groupby("user_id", sort=False)["item_id"]}


def protocol(split: dict) -> dict:
    """The two evaluation views of the leave-one-out protocol:
    valid: history = train, target = valid item; test: history = train + valid, target = test item."""
    train = sequences(split["train"])
    valid_target = dict(zip(split["valid"]["user_id"], split["valid"]["item_id"]))
    test_target = dict(zip(split["test"]["user_id"], split["test"]["item_id"]))
    valid_hist = {u: train.get(u, []) for u in valid_target}
    both = pd.concat([split["train"], split["valid"]]).sort_values("position", kind="stable")
    test_hist_all = sequences(both)
    test_hist = {u: test_hist_all.get(u, []) for u in test_target}
    return {"train": train,
            "valid": {"history": valid_hist, "target": valid_target},
            "test": {"history": test_hist, "target": test_target}}


def ndcg_hr_at_k(ranked: dict, target: dict, k: int = 10) -> tuple:
    "Mean NDCG@k and HR@k of ranked lists (user -> item ids, seen items already removed)."
    ndcg = hr = 0.0
    for user, item in target.items():
        top = ranked.get(user, [])[:k]
        if item in top:
            hr += 1
            ndcg += 1 / math.log2(top.index(item) + 2)
    return ndcg / len(target), hr / len(target)


def atomic_write_text(path, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_topk(path, rows: list):
    "rows: (user_id, item_id, rank, score) tuples; rank starts at 1."
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rank", "score"])
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g"))


def write_meta(out_dir, meta: dict):
    atomic_write_text(Path(out_dir) / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")


def median_ms(fn, users, warmup: int = 10) -> float:
    "Median wall milliseconds of fn(user) over users, after `warmup` untimed calls."
    for u in users[:warmup]:
        fn(u)
    times = []
    for u in users:
        t0 = time.perf_counter()
        fn(u)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


class EarlyStop:
    "Track the best valid NDCG@10; stop after `patience` epochs without improvement."

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.wait, self.state = patience, -1.0, 0, 0, None

    def step(self, epoch: int, value: float, state_fn) -> bool:
        "Returns True when training should stop."
        if value > self.best:
            self.best, self.best_epoch, self.wait, self.state = value, epoch, 0, state_fn()
        else:
            self.wait += 1
        return self.wait >= self.patience


def runner_arguments(doc: str, argv=None):
    "The command line every peer runner takes: split and output folders, seed, epochs, patience, threads, time limit."
    import argparse
    from pathlib import Path
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default 200, --quick 3)")
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="few epochs: a smoke run")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2; see README on busy machines)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop training after this many seconds (recorded in meta.json as stopped_by)")
    return p.parse_args(argv)
