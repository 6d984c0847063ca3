"""Chapter 10: the HTTP service over a run folder and its versions, tested over real HTTP."""
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason='serving needs the serve extra: pip install -e ".[serve]"')
import httpx

from recbook.core import atomic_write_text
from recbook.serve import Answerer, LiveModel, labelled_queries, load_test, load_version, serving

def test_a_version_swaps_whole_and_a_broken_one_is_never_served(served_folder):
    live = LiveModel(served_folder)
    old = live.served
    assert old.version == "v2" and len(old.model_fingerprint) == 16 and live.refresh() is False
    atomic_write_text(served_folder / "models" / "CURRENT", "v1\n")
    assert live.refresh() is True and live.served.version == "v1" and live.swaps == 1
    assert old.service.search("dress", k=3)["item_id"].tolist()  # a request holding the old version still finishes on it
    atomic_write_text(served_folder / "models" / "CURRENT", "v999\n")  # names a version that does not exist
    assert live.refresh() is False and live.served.version == "v1" and "v999" in live.reload_error
    with pytest.raises(ValueError, match="poll_s"):
        LiveModel(served_folder, poll_s=0)


def test_answers_alone_and_batched_are_the_same(served_folder):
    queries = labelled_queries(served_folder)[0][:12]
    live = LiveModel(served_folder)
    atomic_write_text(served_folder / "models" / "CURRENT", "v1\n")  # the transformer: padding is where batches could differ
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


def test_the_real_server_answers_and_rejects_bad_requests_with_4xx(served_folder):
    with serving(served_folder) as url:
        health, version = httpx.get(url + "/health").json(), httpx.get(url + "/version").json()
        assert health["status"] == "ok" and health["version"] == version["version"] == "v2"
        served = load_version(served_folder / "models" / "v2")
        assert (version["model_fingerprint"], version["catalogue_fingerprint"]) == (served.model_fingerprint,
                                                                                   served.catalogue_fingerprint)
        found = httpx.get(url + "/search", params={"q": "summer dress", "k": 3}).json()
        assert found["version"] == "v2" and [r["rank"] for r in found["results"]] == [1, 2, 3]
        assert [r["item_id"] for r in found["results"]] == served.service.search("summer dress", k=3)["item_id"].astype(str).tolist()
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


def test_load_is_sent_to_this_machine_only():
    with pytest.raises(ValueError, match="127.0.0.1"):
        load_test("http://example.com", ["dress"], clients=1, per_client=1)
    with pytest.raises(ValueError, match="clients >= 1"):
        load_test("http://127.0.0.1:9", ["dress"], clients=0, per_client=1)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_search_page_shows_results_in_headless_chromium(served_folder):
    from test_site import chromium
    with serving(served_folder) as url:
        done = chromium("--dump-dom", f"{url}/?q=summer+dress&k=4")
    assert done.returncode == 0, done.stderr[-500:]
    assert 'id="results"' in done.stdout and done.stdout.count("<tr>") == 5  # a header and four items


def test_two_worker_processes_serve_and_both_follow_a_promotion(served_folder):
    import subprocess
    import sys
    import time
    from recbook.serve import free_port
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "recbook.cli", "serve", str(served_folder), "--port", str(port),
                                "--workers", "2", "--poll-s", "0.2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the two workers did not start"
            time.sleep(0.2)
        assert {httpx.get(url + "/version").json()["version"] for _ in range(10)} == {"v2"}
        atomic_write_text(served_folder / "models" / "CURRENT", "v1\n")
        deadline, streak = time.monotonic() + 60, 0
        while streak < 20:  # twenty answers in a row from v1: every worker has switched
            streak = streak + 1 if httpx.get(url + "/version").json()["version"] == "v1" else 0
            assert time.monotonic() < deadline, "not every worker followed models/CURRENT"
        assert httpx.get(url + "/search", params={"q": "dress", "k": 2}).json()["version"] == "v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill(); process.wait()
