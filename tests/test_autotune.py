"""Chapter 08b: the hypervolume against Optuna's, a study shared by two processes and resumed after kill -9, the
command's bad input, and a small real search through the CLI."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

optuna = pytest.importorskip("optuna")
from optuna._hypervolume import compute_hypervolume  # noqa: E402  Optuna's reference implementation

from recbook.autotune import (AutotuneConfig, hypervolume_2d, open_storage, open_study, run_trials,  # noqa: E402
                              StorageError)
from recbook.cli import main  # noqa: E402

HERE = Path(__file__).parent
WORKER = [sys.executable, str(HERE / "autotune_worker.py")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1.5), st.floats(0, 1.5)), min_size=1, max_size=40))
def test_hypervolume_matches_optuna(points):
    p = np.array(points)
    inside = p[(p < 1).all(1)]
    expected = compute_hypervolume(inside, np.ones(2)) if len(inside) else 0.0
    assert hypervolume_2d(p, (1, 1)) == pytest.approx(expected, abs=1e-12)


@given(st.lists(st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)), min_size=1, max_size=20), st.tuples(st.floats(0, 0.99), st.floats(0, 0.99)))
def test_hypervolume_never_shrinks_when_a_point_is_added(points, extra):
    assert hypervolume_2d([*points, extra], (1, 1)) >= hypervolume_2d(points, (1, 1)) - 1e-12


def _states(url):
    study = optuna.load_study(study_name="shared", storage=url)
    return [t for t in study.get_trials(deepcopy=False)]


def test_two_workers_share_one_sqlite_study(tmp_path):
    url, log = f"sqlite:///{tmp_path / 'study.sqlite3'}", tmp_path / "evaluations.log"
    workers = [subprocess.Popen([*WORKER, url, "20", str(seed), str(log), "0.05"]) for seed in (1, 2)]
    for w in workers:
        assert w.wait(timeout=240) == 0
    trials = _states(url)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 20
    assert len({t.number for t in complete}) == 20
    assert all(not t.user_attrs.get("surplus") for t in complete)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING", "FAIL")]
    assert len(log.read_text().splitlines()) == 20  # every evaluation became one complete trial: none lost, none twice


def test_a_study_resumes_after_kill_9_without_running_finished_trials(tmp_path):
    url, log = f"sqlite:///{tmp_path / 'study.sqlite3'}", tmp_path / "evaluations.log"
    worker = subprocess.Popen([*WORKER, url, "6", "0", str(log), "1.0"])
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.2)
        if os.path.exists(tmp_path / "study.sqlite3") and sum(t.state.name == "COMPLETE" for t in _try_states(url)) >= 2:
            break
    time.sleep(0.5)  # into the next trial
    os.kill(worker.pid, signal.SIGKILL); worker.wait()
    before = {t.number: t.values for t in _states(url) if t.state.name == "COMPLETE"}
    evaluated_before = len(log.read_text().splitlines())
    assert 2 <= len(before) < 6
    study = open_study(open_storage(url, heartbeat=1), "shared", "random", seed=0, trials=6)
    from autotune_worker import SPACE, evaluator
    run_trials(study, evaluator(log, 0.01), SPACE, 6, poll=0.2)
    after = {t.number: t.values for t in _states(url) if t.state.name == "COMPLETE"}
    assert len(after) == 6
    assert all(after[n] == v for n, v in before.items())  # finished trials kept, not run again
    assert len(log.read_text().splitlines()) - evaluated_before == 6 - len(before)
    assert any(t.state.name == "FAIL" for t in _states(url))  # the killed trial, failed by its missing heartbeat, then retried


def _try_states(url):
    try:
        return _states(url)
    except Exception:  # the worker has not created the study yet
        return []


def _run_cli(capsys, *args):
    code = main(["optimize", *args])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    (["--trials", "2", "--space", "heads=6"], "Unknown knob 'heads'"),
    (["--trials", "2", "--space", "layers="], "no choices"),
    (["--trials", "2", "--space", "layers=1;placement=even;ffn_keep=1.0;temperature=2.0;epochs=1;int8=off;"
      "query_max_length=32;ef_search=0"], "single setting"),
    (["--trials", "2", "--storage", "sqlite:////no/such/folder/study.sqlite3"], "Cannot open the study storage"),
    (["--trials", "2", "--storage", "postgresql://user:secret@127.0.0.1:1/none"], "Cannot open the study storage"),
    (["--sampler", "random"], "add --trials N"),
    (["--trials", "2", "--task", "recommendation"], "--trials: for --task search only"),
])
def test_bad_search_input_is_one_line(tmp_path, capsys, args, message):
    code, err = _run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2 and message in err and "\n" not in err and "secret" not in err


TINY = "layers=1,2;placement=even;ffn_keep=1.0;temperature=2.0;epochs=1;int8=off;query_max_length=16,32;ef_search=0"


def test_a_small_search_through_the_command(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _run_cli(capsys, "--trials", "2", "--quick", "--space", TINY, "--no-progress", "--out", str(out))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["study"]["trials"] == 2 and (out / "study.png").is_file() and (out / "study.sqlite3").is_file()
    from recbook.pipeline import load_optimized
    engine = load_optimized(out)
    assert engine.meta["chosen"] == results["chosen"] and len(engine.search("black dress", k=5)) == 5

    code, err = _run_cli(capsys, "--trials", "2", "--quick", "--space", TINY, "--budget-ms", "0.0001", "--no-progress",
                         "--out", str(out))
    assert code == 2 and "No trial meets the budget" in err and "--budget-ms" in err

    code, err = _run_cli(capsys, "--trials", "3", "--quick", "--space", TINY, "--no-progress", "--out", str(out))
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())
    assert again["study"]["trials"] == 3
    assert again["study"]["table"][:2] == results["study"]["table"]  # the finished trials are read back, not rerun


def test_one_config_file_feeds_both_readers(tmp_path):
    from recbook.autotune import autotune_config
    from recbook.pipeline import load_config
    path = tmp_path / "recipe.toml"
    path.write_text('quick = true\nspeedup = 3.0\n\n[autotune]\ntrials = 7\nsampler = "random"\n')
    assert load_config(path).speedup == 3.0 and load_config(path).quick
    tune = autotune_config(path, seed=4)
    assert (tune.trials, tune.sampler, tune.seed) == (7, "random", 4)
    assert autotune_config(path, trials=None).trials == 7  # None means: not given
    path.write_text('[autotune]\nheads = 3\n')
    with pytest.raises(ValueError, match=r"Unknown \[autotune\] keys \['heads'\]"):
        autotune_config(path)
    path.write_text('autotune = 3\n')
    with pytest.raises(ValueError, match=r"must be a table"):
        autotune_config(path)
