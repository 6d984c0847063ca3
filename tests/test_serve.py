"""Chapter 10: the HTTP service over a run folder, its versions, promotion and rollback, tested over real HTTP."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='serving needs the serve extra: pip install -e ".[serve]"')
import httpx

from recbook.core import atomic_write_text
from recbook.pipeline import current_export, load_config, load_optimized, optimize
from recbook.serve import (Answerer, LiveModel, PromotionRefused, _top_ids, history, labelled_queries, load_test,
                           load_version, promote, rollback, serving, shadow_evaluate, swap_under_load)

SIZES = {"train_queries": 48, "eval_queries": 30, "layers": [1], "repeats": 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_encoder, own_table):
    "A run folder with two versions: v1 the most accurate transformer, v2 the static query encoder (live)."
    import recbook.pipeline as pipeline
    from test_pipeline import fixed_latencies  # the choice must not depend on how busy the machine is
    out = tmp_path_factory.mktemp("serve") / "run"
    config = lambda **rule: load_config(encoder=tiny_encoder, data=str(own_table), item="sku", text="body", query="headline",
                                        rating="stars", item_features=["category"], quick=True, sizes=SIZES, **rule)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "query_latencies", fixed_latencies)
        first = optimize(config(static=False, budget_ms=1e6), out, progress=False)
        second = optimize(config(static=True, budget_ms=0.2), out, progress=False)  # only the static encoder is that fast
    assert (Path(first["export"]).name, Path(second["export"]).name) == ("v1", "v2")
    assert second["chosen"] == "static query encoder" != first["chosen"]
    return out


@pytest.fixture
def folder(run):
    "The run folder with v2 live and a fresh history, whatever the test before did."
    atomic_write_text(run / "models" / "CURRENT", "v2\n")
    atomic_write_text(run / "models" / "HISTORY", "v2\n")
    return run


def test_a_version_swaps_whole_and_a_broken_one_is_never_served(folder):
    live = LiveModel(folder)
    old = live.served
    assert old.version == "v2" and len(old.model_fingerprint) == 16 and live.refresh() is False
    atomic_write_text(folder / "models" / "CURRENT", "v1\n")
    assert live.refresh() is True and live.served.version == "v1" and live.swaps == 1
    assert old.service.search("dress", k=3)["item_id"].tolist()  # a request holding the old version still finishes on it
    atomic_write_text(folder / "models" / "CURRENT", "v7\n")  # names a version that does not exist
    assert live.refresh() is False and live.served.version == "v1" and "v7" in live.reload_error
    with pytest.raises(ValueError, match="poll_s"):
        LiveModel(folder, poll_s=0)


def test_answers_alone_and_batched_are_the_same(folder):
    queries = labelled_queries(folder)[0][:12]
    live = LiveModel(folder)
    atomic_write_text(folder / "models" / "CURRENT", "v1\n")  # the transformer: padding is where batches could differ
    live.refresh()
    batched, alone = Answerer(live, max_batch=32, max_wait_ms=100), Answerer(live, max_batch=1)
    try:
        with ThreadPoolExecutor(len(queries)) as pool:
            together = list(pool.map(lambda q: batched.ask([q], k=5)[1][0], queries))
        apart = [alone.ask([q], k=5)[1][0] for q in queries]
        assert max(batched.batcher.batch_sizes) > 1 and set(alone.batcher.batch_sizes) == {1}
        assert [[r["item_id"] for r in a] for a in together] == [[r["item_id"] for r in a] for a in apart]
        assert [r["retrieval_score"] for a in together for r in a] == pytest.approx(
            [r["retrieval_score"] for a in apart for r in a], abs=1e-5)
        with pytest.raises(ValueError, match="empty"):
            batched.ask(["dress", "   "])  # a bad query fails its request before anything is queued
        with pytest.raises(ValueError, match="k must be"):
            batched.ask(["dress"], k=0)
    finally:
        batched.close(); alone.close()


def test_the_real_server_answers_and_rejects_bad_requests_with_4xx(folder):
    with serving(folder) as url:
        health, version = httpx.get(url + "/health").json(), httpx.get(url + "/version").json()
        assert health["status"] == "ok" and health["version"] == version["version"] == "v2"
        served = load_version(folder / "models" / "v2")
        assert (version["model_fingerprint"], version["catalogue_fingerprint"]) == (served.model_fingerprint,
                                                                                   served.catalogue_fingerprint)
        found = httpx.get(url + "/search", params={"q": "summer dress", "k": 3}).json()
        assert found["version"] == "v2" and [r["rank"] for r in found["results"]] == [1, 2, 3]
        assert [r["item_id"] for r in found["results"]] == _top_ids(served, ["summer dress"], k=3)[0]
        batch = httpx.post(url + "/search/batch", json={"queries": ["summer dress", "jeans"], "k": 2}).json()
        assert [len(r["results"]) for r in batch["results"]] == [2, 2]
        assert [r["item_id"] for r in batch["results"][0]["results"]] == [r["item_id"] for r in found["results"][:2]]
        bad = [httpx.get(url + "/search"), httpx.get(url + "/search", params={"q": " \t "}),
               httpx.get(url + "/search", params={"q": "x" * 1001}), httpx.get(url + "/search", params={"q": "a", "k": 0}),
               httpx.get(url + "/search", params={"q": "a", "k": 101}), httpx.get(url + "/search", params={"q": "a", "k": "2.5"}),
               httpx.post(url + "/search/batch", json={"queries": []}), httpx.post(url + "/search/batch", json={"queries": ["a"] * 65}),
               httpx.post(url + "/search/batch", json={"queries": [1]}), httpx.post(url + "/search/batch", content=b"not json"),
               httpx.get(url + "/", params={"q": "dress", "k": "many"})]
        assert [r.status_code for r in bad] == [422] * len(bad)
        odd = httpx.get(url + "/search?q=%ff%fe%00dress")  # bytes that are no UTF-8: an answer, never a 500
        assert odd.status_code in (200, 422)
        page = httpx.get(url + "/", params={"q": "<b>dress</b>"}).text
        assert 'id="results"' in page and "<b>dress" not in page and "&lt;b&gt;dress" in page
        schema = httpx.get(url + "/openapi.json").json()
        assert {"/search", "/search/batch", "/health", "/version"} <= set(schema["paths"])
        assert httpx.get(url + "/health").json()["requests"] >= 4


def test_a_swap_under_concurrent_clients_fails_nothing_and_mixes_nothing(folder):
    queries = labelled_queries(folder)[0]
    with serving(folder, poll_s=0.2) as url:
        swap = swap_under_load(url, folder, "v1", queries, clients=8, per_client=3)
    assert swap["failed"] == 0 and swap["mismatched"] == 0 and swap["answered"] == swap["requests"]
    assert set(swap["versions"]) == {"v1", "v2"} and (swap["from"], swap["to"]) == ("v2", "v1")
    assert history(folder) == ["v2", "v1"]


def test_promotion_refuses_a_regression_beyond_noise_unless_forced(folder):
    queries = labelled_queries(folder)[0]
    live, candidate = load_version(folder / "models" / "v2"), load_version(folder / "models" / "v1")
    ours, theirs = _top_ids(live, queries), _top_ids(candidate, queries)
    assert sum(a[0] != b[0] for a, b in zip(ours, theirs)) >= len(queries) / 3, "the two versions must rank differently"
    relevant = [{top[0]: 2.0} for top in ours]  # the live version is perfect on these labels
    report = shadow_evaluate(live, candidate, queries, relevant, repeats=1, resamples=500)
    assert report["live_ndcg@10"] == pytest.approx(1.0) and report["regression"] and report["ratio_high"] < 1
    assert 0 <= report["overlap@10"] <= 1 and report["live_ms_p50"] > 0
    with pytest.raises(PromotionRefused, match="--force"):
        promote(folder, "v1", queries, relevant, repeats=1)
    assert current_export(folder).name == "v2"
    assert promote(folder, "v1", queries, relevant, force=True, repeats=1)["live"] == "v1"
    assert promote(folder, "v1")["promoted"] is False  # live already
    with pytest.raises(ValueError, match="no version 'v9'"):
        promote(folder, "v9")
    assert rollback(folder) == {"live": "v2", "previous": "v1"} and history(folder) == ["v2"]
    assert rollback(folder)["live"] == "v1"  # no older entry: the version below the live one
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback(folder)


def test_a_promotion_killed_midway_leaves_a_whole_version(folder):
    script = ("import sys; from recbook.serve import labelled_queries, promote\n"
              "q, r = labelled_queries(sys.argv[1]); print('evaluating', flush=True)\n"
              "promote(sys.argv[1], 'v1', q * 20, r * 20, repeats=200)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "evaluating"
    time.sleep(1.0)
    process.kill(); process.wait()
    assert process.returncode != 0 and current_export(folder).name == "v2"
    assert load_optimized(folder).search("dress", k=2)["item_id"].tolist()
    atomic_write_text(folder / "models" / "CURRENT", "v1\n")  # killed after CURRENT, before HISTORY
    assert history(folder) == ["v2", "v1"] and rollback(folder)["live"] == "v2"


def test_load_is_sent_to_this_machine_only():
    with pytest.raises(ValueError, match="127.0.0.1"):
        load_test("http://example.com", ["dress"], clients=1, per_client=1)
    with pytest.raises(ValueError, match="clients >= 1"):
        load_test("http://127.0.0.1:9", ["dress"], clients=0, per_client=1)


def recbook(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "recbook.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_errors_are_one_line_and_promote_takes_a_query_log(folder, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0)); taken.listen()
        cases = {("serve", tmp_path): "holds no export", ("serve", folder, "--port", taken.getsockname()[1]): "cannot listen",
                 ("promote", folder, "v9"): "no version 'v9'", ("rollback", tmp_path): "not a run folder",
                 ("promote", folder, "v1", "--queries", tmp_path / "none.txt"): "No such file"}
        for args, message in cases.items():
            done = recbook(*args)
            assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
    log = tmp_path / "log.txt"
    log.write_text("summer dress\n\njeans\n", encoding="utf-8")
    done = recbook("promote", folder, "v1", "--queries", log)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["live"] == "v1" and report["shadow"]["queries"] == 2
    assert "live_ndcg@10" not in report["shadow"]  # a log has no labels: overlap and latency only
    assert json.loads(recbook("rollback", folder).stdout)["live"] == "v2"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_search_page_shows_results_in_headless_chromium(folder):
    from test_site import chromium
    with serving(folder) as url:
        done = chromium("--dump-dom", f"{url}/?q=summer+dress&k=4")
    assert done.returncode == 0, done.stderr[-500:]
    assert 'id="results"' in done.stdout and done.stdout.count("<tr>") == 5  # a header and four items
