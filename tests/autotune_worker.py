"""A worker process for tests/test_autotune.py: runs trials of a shared study with a cheap stand-in objective,
logging each evaluation, so that a test can count what ran where."""
import sys
import time
from pathlib import Path

from recbook.autotune import open_storage, open_study, run_trials

SPACE = {"layers": [1, 2, 3, 6], "query_max_length": [16, 32], "ef_search": [0, 16, 64]}


def evaluator(log: Path, seconds: float):
    def evaluate(knobs):
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"{knobs['layers']} {knobs['query_max_length']} {knobs['ef_search']}\n")
        return (1 / knobs["layers"], float(knobs["layers"] * knobs["query_max_length"])), {"pid": 0}
    return evaluate


def main(url: str, trials: int, seed: int, log: str, seconds: float) -> None:
    study = open_study(open_storage(url, heartbeat=1), "shared", "random", seed=seed, trials=trials)
    run_trials(study, evaluator(Path(log), seconds), SPACE, trials, poll=0.2)


if __name__ == "__main__":
    url, trials, seed, log, seconds = sys.argv[1:6]
    main(url, int(trials), int(seed), log, float(seconds))
