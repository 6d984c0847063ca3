"""Run the peer SASRec baselines on recbook's split, each peer from its own venv as a subprocess.

Runs in recbook's main venv (stdlib + pandas only; recbook itself is imported only to write the split):

    python tools/peers/run_peers.py [--peers recbole rectools] [--seeds 0 1 2] [--quick]
                                    [--split-dir DIR] [--out-dir runs/peers] [--threads 2] [--epochs N]
                                    [--patience P] [--time-limit S]

Writes OUT_DIR/NAME-seedS/{topk.csv,valid_topk.csv,meta.json,log.txt} and prints one line per run.
A peer whose venv (~/.cache/recbook/peers/NAME-venv) is missing is skipped with the command that makes it.
Score the results with:  python tools/peers/score.py OUT_DIR/*-seed*
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = {"recbole": "recbole_sasrec.py", "rectools": "rectools_sasrec.py"}


def peers_root() -> Path:
    return Path(os.environ.get("RECBOOK_PEERS_DIR", Path.home() / ".cache" / "recbook" / "peers"))


def venv_python(name: str) -> Path:
    return peers_root() / f"{name}-venv" / "bin" / "python"


def ensure_split(split_dir: Path) -> Path:
    "Write recbook's MovieLens split with RecommendationTask.save unless the folder already holds one."
    if not (split_dir / "task.json").exists():
        from recbook.histories import MOVIELENS_COLUMNS, build_recommendation_task, load_movielens
        build_recommendation_task(load_movielens(), **MOVIELENS_COLUMNS).save(split_dir)
    return split_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--quick", action="store_true", help="a few epochs per run: checks the plumbing")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (runner default: 200, quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads inside each peer")
    p.add_argument("--time-limit", type=float, default=None, help="seconds of training per run")
    p.add_argument("--patience", type=int, default=None, help="early-stop patience in epochs (runner default 10)")
    p.add_argument("--split-dir", type=Path, default=Path("runs/peers/split"))
    p.add_argument("--out-dir", type=Path, default=Path("runs/peers"))
    a = p.parse_args(argv)
    split_dir = ensure_split(a.split_dir)
    done, failed = [], []
    for name in a.peers:
        python = venv_python(name)
        if not python.exists():
            print(f"skip {name}: no venv at {python.parent.parent}; make it with: bash tools/peers/setup.sh {name}")
            continue
        for seed in a.seeds:
            tag = ("-quick" if a.quick else "") + (f"-patience{a.patience}" if a.patience else "")
            out = a.out_dir / f"{name}{tag}-seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            cmd = [str(python), "-u", str(HERE / PEERS[name]), str(split_dir), str(out), "--seed", str(seed),
                   "--threads", str(a.threads)]
            cmd += ["--quick"] if a.quick else []
            cmd += ["--epochs", str(a.epochs)] if a.epochs else []
            cmd += ["--time-limit", str(a.time_limit)] if a.time_limit else []
            cmd += ["--patience", str(a.patience)] if a.patience else []
            t0 = time.perf_counter()
            with open(out / "log.txt", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                print(f"{name} seed {seed}: failed (exit {rc}); see {out / 'log.txt'}")
                failed.append(out)
                continue
            meta = json.loads((out / "meta.json").read_text())
            print(f"{name} seed {seed}: {meta['epochs_run']} epochs ({meta['stopped_by']}), "
                  f"{meta['train_seconds']:.0f}s train, {meta['ms_per_user']:.1f} ms/user, "
                  f"valid ndcg@10 {meta['valid_ndcg10_best']:.4f} -> {out} ({time.perf_counter() - t0:.0f}s)")
            done.append(out)
    if done:
        print("score with: python tools/peers/score.py " + " ".join(map(str, done)))
    return done, failed


if __name__ == "__main__":
    sys.exit(1 if main()[1] else 0)
