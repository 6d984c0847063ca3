"""Chapter 08: `recbook optimize` stages, resumption, the saved search object and the report."""
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from recbook.infer import SearchService, StaleCacheError
from recbook.pipeline import (PipelineConfig, StageCache, content_key, load_config, load_optimized, markdown_table,
                              optimize)

SIZES = {"train_queries": 48, "eval_queries": 30, "layers": [1], "repeats": 3}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, tokenizer):
    from conftest import tiny_bert
    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    tiny_bert(tokenizer, hidden=32, layers=2, heads=2, ffn=64).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def own_table(tmp_path_factory):
    "The user's own table: the shipped reviews of 40 items, with other column names, as CSV."
    from recbook.data import load_reviews
    reviews = load_reviews()
    items = reviews["Clothing ID"].value_counts().index[:40]
    table = reviews[reviews["Clothing ID"].isin(items)].rename(columns={
        "Clothing ID": "sku", "Review Text": "body", "Title": "headline", "Rating": "stars", "Class Name": "category"})
    path = tmp_path_factory.mktemp("data") / "mine.csv"
    table[["sku", "body", "headline", "stars", "category"]].to_csv(path, index=False)
    return path


def config_for(encoder, data, **extra):
    return load_config(encoder=encoder, data=str(data), item="sku", text="body", query="headline", rating="stars",
                       item_features=["category"], quick=True, sizes=SIZES, **extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_encoder, own_table):
    out = tmp_path_factory.mktemp("run") / "out"
    return out, optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), out, progress=False)


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("quick = [")
    with pytest.raises(ValueError, match="Could not read the config file"):
        load_config(bad)
    with pytest.raises(ValueError, match="Unknown config keys"):
        load_config(epochs=3)
    with pytest.raises(ValueError, match="Unknown sizes"):
        load_config(sizes={"batch": 3})
    with pytest.raises(ValueError, match="positive"):
        load_config(budget_ms=0)


def test_stage_cache_resumes_and_never_leaves_half_a_stage(tmp_path):
    cache, built = StageCache(tmp_path), []

    def build(folder):
        built.append(folder); (folder / "out.txt").write_text("x")
    key = content_key("stage", {"a": 1})
    assert cache.run("s", key, build) == cache.run("s", key, build) and len(built) == 1
    assert content_key("stage", {"a": 1}) != content_key("stage", {"a": 2})

    def killed(folder):
        (folder / "half").write_text("..."); raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        cache.run("k", "key", killed)
    assert not (tmp_path / "k-key").exists() and not list(tmp_path.glob(".k-*"))


def test_own_data_and_encoder_end_to_end(finished):
    out, results = finished
    names = [v["name"] for v in results["variants"]]
    assert names[0] == "teacher" and "1-layer distilled" in names and "1-layer distilled + int8" in names
    quality = {v["name"]: v["valid_ndcg@10"] for v in results["variants"]}
    assert results["selection"]["met"] and quality[results["chosen"]] == max(quality.values())  # a generous budget: best wins
    for v in results["variants"]:
        assert 0 <= v["test_ndcg@10"] <= 1 and v["latency_ms_p50"] > 0 and v["size_mb"] > 0
    report = (out / "report.md").read_text()
    assert results["chosen"] in report and "pareto.png" in report and (out / "pareto.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["chosen"] == results["chosen"]
    assert not list(out.rglob("*.tmp"))


def test_rerun_reuses_every_stage_and_gives_the_same_results(finished, tiny_encoder, own_table):
    out, first = finished
    again = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), out, progress=False)
    assert again["stages"]["ran"] == [] and again["chosen"] == first["chosen"]
    assert [v["valid_ndcg@10"] for v in again["variants"]] == [v["valid_ndcg@10"] for v in first["variants"]]


def test_rerun_times_latency_again_interleaved(finished, tiny_encoder, own_table, tmp_path, monkeypatch):
    import recbook.pipeline as pipeline
    out, first = finished
    shutil.copytree(out, tmp_path / "out")
    timed = []
    real = pipeline.measure_latencies
    monkeypatch.setattr(pipeline, "measure_latencies", lambda fns, **kw: (timed.append(sorted(fns)), real(fns, **kw))[1])
    again = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), tmp_path / "out", progress=False)
    assert again["stages"]["ran"] == []  # nothing trained or evaluated again...
    assert timed == [sorted(v["name"] for v in first["variants"])]  # ...but every candidate timed, in one interleaved call
    assert [v["latency_ms_p50"] for v in again["variants"]] != [v["latency_ms_p50"] for v in first["variants"]]
    assert again["wall_seconds"] > 0 and "wall time" in (tmp_path / "out" / "report.md").read_text()


def test_killed_run_resumes_to_the_uninterrupted_result(finished, tiny_encoder, own_table, tmp_path, monkeypatch):
    import recbook.pipeline as pipeline
    _, uninterrupted = finished
    real, calls = pipeline.measure_candidate, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while measuring the second candidate
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "measure_candidate", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), tmp_path / "out", progress=False)
    monkeypatch.setattr(pipeline, "measure_candidate", real)
    resumed = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), tmp_path / "out", progress=False)
    assert "teacher" not in resumed["stages"]["ran"] and "teacher" in resumed["stages"]["reused"]
    pick = lambda r: [(v["name"], round(v["valid_ndcg@10"], 6), round(v["test_ndcg@10"], 6)) for v in r["variants"]]
    assert pick(resumed) == pick(uninterrupted)  # the same models, to the last digit of their quality
    # the choice is the same up to latency noise: re-measured stages can reorder candidates of equal quality
    quality = lambda r: next(v["valid_ndcg@10"] for v in r["variants"] if v["name"] == r["chosen"])
    assert quality(resumed) == quality(uninterrupted)


def test_changed_input_reruns_what_depends_on_it(finished, tiny_encoder, own_table, tmp_path):
    out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    changed = tmp_path / "changed.csv"
    table = pd.read_csv(own_table)
    table.loc[table["headline"].notna().idxmax(), "headline"] = "a brand new title for a dress"
    table.to_csv(changed, index=False)
    results = optimize(config_for(tiny_encoder, changed, budget_ms=1e6), copy, progress=False)
    assert "teacher" in results["stages"]["ran"]
    budget_only = optimize(config_for(tiny_encoder, own_table, budget_ms=1e-6), copy, progress=False)
    assert budget_only["stages"]["ran"] == []  # the selection rule is not a stage input
    assert budget_only["selection"]["met"] is False


def test_load_optimized_searches_and_refuses_stale_files(finished, tmp_path):
    out, results = finished
    engine = load_optimized(out)
    assert isinstance(engine, SearchService) and engine.meta["chosen"] == results["chosen"]
    top = engine.search("black maxi dress", k=5)
    assert len(top) == 5 and top["retrieval_score"].is_monotonic_decreasing and {"item_id", "category"} <= set(top.columns)
    scores = engine.encoder.encode(["black maxi dress"], max_length=engine.encoder.query_max_length).float() @ engine.embeddings.T
    assert top["item_id"].tolist() == engine.items["item_id"].to_numpy()[scores[0].topk(5).indices.numpy()].tolist()
    several = engine.search(["black maxi dress", "jeans"], k=3)
    assert [len(t) for t in several] == [3, 3]
    # row-wise int8 quantizes each token on its own, so a query's answer does not depend on its batch-mates
    pd.testing.assert_frame_equal(several[0], engine.search("black maxi dress", k=3), rtol=0, atol=1e-6)
    for bad, error in [("", ValueError), ("   ", ValueError), (None, TypeError), ([None], TypeError)]:
        with pytest.raises(error, match="empty|must be a string"):
            engine.search(bad)
    stale = tmp_path / "stale"
    shutil.copytree(out / "model", stale)
    items = pd.read_parquet(stale / "items.parquet")
    items.loc[0, "document"] = "something else"
    items.to_parquet(stale / "items.parquet")
    with pytest.raises(StaleCacheError, match="different catalogue.*run `recbook optimize` again"):
        load_optimized(stale)
    (stale / "catalogue.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_optimized(stale)
    with pytest.raises(ValueError, match="not a folder written by"):
        load_optimized(tmp_path)


def test_top_level_import_and_markdown_table(finished):
    import recbook
    out, _ = finished
    assert isinstance(recbook.load_optimized(out).embeddings, torch.Tensor)
    frame = pd.DataFrame({"a": [1.25, float("nan")]}, index=pd.Index(["x", "y"], name="name"))
    assert markdown_table(frame).splitlines() == ["| name | a |", "| --- | --- |", "| x | 1.25 |", "| y |  |"]


def test_cli_optimize_rejects_bad_columns_and_search_answers(finished, own_table, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "recbook.cli", *a], capture_output=True, text=True, timeout=300)
    bad = run("optimize", "--data", str(own_table), "--item", "no_such_column", "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "no_such_column" in bad.stderr
    out, _ = finished
    answer = run("search", str(out), "black maxi dress", "-k", "2")
    assert answer.returncode == 0 and answer.stdout.startswith("# black maxi dress")
    assert "retrieval_score" in answer.stdout and "rerank_score" not in answer.stdout  # no reranker: no empty column
    for args, message in [((str(tmp_path), "dress"), "not a folder written by"), ((str(out), "  "), "empty")]:
        refused = run("search", *args)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_augmentation_and_knowledge_switches(tiny_encoder, own_table, tmp_path, finished):
    _, plain = finished
    with pytest.raises(ValueError, match="label-preserving"):
        config_for(tiny_encoder, own_table, augment="antonym")
    results = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6, augment="keyboard", knowledge=True),
                       tmp_path / "out", progress=False)
    assert results["task_fingerprint"] != plain["task_fingerprint"]  # the documents now carry their facts
    assert "teacher" in results["stages"]["ran"]
    engine = load_optimized(tmp_path / "out")
    assert engine.items["document"].str.contains("mentions|usually mention|is a kind of").any()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "augmentation keyboard; knowledge fusion on" in report
