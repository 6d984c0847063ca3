"""Score a peer's rankings with recbook's own metrics (runs in recbook's main venv).

    python tools/peers/score.py OUT_DIR [OUT_DIR ...] [--split test|valid] [--k 10] [--popularity]

Each OUT_DIR holds topk.csv (test) / valid_topk.csv (valid) with columns user_id,item_id,rank,score.
The [users x items] score matrix is rebuilt with rows = task.targets(split) and columns = task.items:
a listed item scores -rank, an unlisted one -inf (recbook.recommend.topk_scores); recbook.histories.evaluate_recommendations then
masks seen items and computes HR@k, NDCG@k and MRR over the full catalogue.
"""
import argparse, json, sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recbook.recommend import topk_scores
from recbook.histories import (MOVIELENS_COLUMNS, build_recommendation_task, evaluate_recommendations,
                               load_movielens, popularity_scores)


def load_task():
    return build_recommendation_task(load_movielens(), **MOVIELENS_COLUMNS)


def score_dir(out: Path, task, split: str = "test", k: int = 10) -> dict:
    name = "topk.csv" if split == "test" else "valid_topk.csv"
    topk = pd.read_csv(out / name, dtype={"user_id": str, "item_id": str})
    report = evaluate_recommendations(topk_scores(topk, task, split), task, split, k=k)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return {"run": str(out), "library": meta.get("library"), "seed": meta.get("seed"),
            "epochs": meta.get("epochs_run"), "train_seconds": meta.get("train_seconds"),
            "ms_per_user": meta.get("ms_per_user"), **report}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", nargs="*", type=Path)
    p.add_argument("--split", default="test", choices=("test", "valid"))
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--popularity", action="store_true", help="also score recbook's popularity baseline")
    a = p.parse_args(argv)
    task = load_task()
    rows = []
    if a.popularity:
        rows.append({"run": "popularity", "library": "recbook",
                     **evaluate_recommendations(popularity_scores(task, a.split), task, a.split, k=a.k)})
    rows += [score_dir(d, task, a.split, a.k) for d in a.out_dirs]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=[c for c in table if c.startswith("cold_")]).round(4).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
