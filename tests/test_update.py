"""Chapter 10a: shadow evaluation, promotion, rollback and a swap under load, on a real server over HTTP."""
import json
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason='serving needs the serve extra: pip install -e ".[serve]"')

from recbook.core import atomic_write_text
from recbook.pipeline import current_export, load_optimized
from recbook.serve import labelled_queries, load_version, serving
from recbook.update import PromotionRefused, _top_ids, history, promote, rollback, shadow_evaluate, swap_under_load


def test_a_swap_under_concurrent_clients_fails_nothing_and_mixes_nothing(served_folder):
    queries = labelled_queries(served_folder)[0]
    with serving(served_folder, poll_s=0.2) as url:
        swap = swap_under_load(url, served_folder, "v1", queries, clients=8, per_client=3)
    assert swap["failed"] == 0 and swap["mismatched"] == 0 and swap["answered"] == swap["requests"]
    assert set(swap["versions"]) == {"v1", "v2"} and (swap["from"], swap["to"]) == ("v2", "v1")
    assert swap["steady_rounds"] >= 2 and swap["p99_ms_steady"] > 0 and swap["p99_ms_swap"] > 0
    assert history(served_folder) == ["v2", "v1"]


def test_promotion_refuses_a_regression_beyond_noise_unless_forced(served_folder):
    queries = labelled_queries(served_folder)[0]
    live, candidate = load_version(served_folder / "models" / "v2"), load_version(served_folder / "models" / "v1")
    ours, theirs = _top_ids(live, queries), _top_ids(candidate, queries)
    assert sum(a[0] != b[0] for a, b in zip(ours, theirs)) >= len(queries) / 3, "the two versions must rank differently"
    relevant = [{top[0]: 2.0} for top in ours]  # the live version is perfect on these labels
    report = shadow_evaluate(live, candidate, queries, relevant, repeats=1, resamples=500)
    assert report["live_ndcg@10"] == pytest.approx(1.0) and report["regression"] and report["ratio_high"] < 1
    assert 0 <= report["overlap@10"] <= 1 and report["live_ms_p50"] > 0
    with pytest.raises(PromotionRefused, match="--force"):
        promote(served_folder, "v1", queries, relevant, repeats=1)
    assert current_export(served_folder).name == "v2"
    assert promote(served_folder, "v1", queries, relevant, force=True, repeats=1)["live"] == "v1"
    assert promote(served_folder, "v1")["promoted"] is False  # live already
    with pytest.raises(ValueError, match="no version 'v999'"):
        promote(served_folder, "v999")
    assert rollback(served_folder) == {"live": "v2", "previous": "v1"} and history(served_folder) == ["v2"]
    assert rollback(served_folder)["live"] == "v1"  # no older entry: the version below the live one
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(served_folder)


def test_a_promotion_killed_midway_leaves_a_whole_version(served_folder):
    script = ("import sys; from recbook.update import labelled_queries, promote\n"
              "q, r = labelled_queries(sys.argv[1]); print('evaluating', flush=True)\n"
              "promote(sys.argv[1], 'v1', q * 20, r * 20, repeats=200)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(served_folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "evaluating"
    time.sleep(1.0)
    process.kill(); process.wait()
    assert process.returncode != 0 and current_export(served_folder).name == "v2"
    assert load_optimized(served_folder).search("dress", k=2)["item_id"].tolist()
    atomic_write_text(served_folder / "models" / "CURRENT", "v1\n")  # killed after CURRENT, before HISTORY
    assert history(served_folder) == ["v2", "v1"] and rollback(served_folder)["live"] == "v2"


def recbook(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "recbook.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_errors_are_one_line_and_promote_takes_a_query_log(served_folder, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0)); taken.listen()
        cases = {("serve", tmp_path): "holds no export", ("serve", served_folder, "--port", taken.getsockname()[1]): "cannot listen",
                 ("promote", served_folder, "v999"): "no version 'v999'", ("rollback", tmp_path): "not a run folder",
                 ("promote", served_folder, "v1", "--queries", tmp_path / "none.txt"): "No such file"}
        for args, message in cases.items():
            done = recbook(*args)
            assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
    log = tmp_path / "log.txt"
    log.write_text("summer dress\n\njeans\n", encoding="utf-8")
    done = recbook("promote", served_folder, "v1", "--queries", log)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["live"] == "v1" and report["shadow"]["queries"] == 2
    assert "live_ndcg@10" not in report["shadow"]  # a log has no labels: overlap and latency only
    assert json.loads(recbook("rollback", served_folder).stdout)["live"] == "v2"


