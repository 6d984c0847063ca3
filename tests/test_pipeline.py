"""Chapter 08: `recbook optimize` stages, resumption, the saved search object and the report."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from recbook.infer import SearchService, StaleCacheError
from recbook.pipeline import query_latencies
from recbook.pipeline import (OutputFolderError, PipelineConfig, StageCache, claim_run_folder, content_key,
                              current_export, export_search, load_config, load_optimized, markdown_table, optimize)

SIZES = {"train_queries": 48, "eval_queries": 30, "layers": [1], "repeats": 3}


def fixed_latencies(models, catalogues, queries, repeats, k=10):
    """Latencies that depend only on the model (layers, int8), never on the machine: the tests about caching, resuming
    and loading must not depend on how busy the machine is. Choice under noise has its own tests below."""
    def row(model):
        if not hasattr(model, "encoder"):  # chapter 05b's static query encoder: no layers at all
            ms = 0.1
        else:
            ms = model.encoder.config.num_hidden_layers * (0.5 if getattr(model, "quantized", None) else 1.0)
        return {"latency_ms_p50": ms, "latency_ms_low": 0.95 * ms, "latency_ms_high": 1.05 * ms, "latency_ms_p95": 1.1 * ms,
                "latency_ms_std": 0.05 * ms, "throughput": 1e3 / ms}
    return {name: row(model) for name, model in models.items()}


@pytest.fixture(scope="module", autouse=True)
def machine_independent_latency():
    import recbook.pipeline as pipeline
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "query_latencies", fixed_latencies)
        yield


def digest(folder):
    "Every file under `folder` with the sha256 of its bytes."
    import hashlib
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def config_for(encoder, data, **extra):
    return load_config(encoder=encoder, data=str(data), item="sku", text="body", query="headline", rating="stars",
                       item_features=["category"], quick=True, sizes=SIZES, **{"static": True, **extra})


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
    assert names[-1] == "static query encoder"
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
    monkeypatch.setattr(pipeline, "query_latencies", query_latencies)  # the real harness, for this test only
    monkeypatch.setattr(pipeline, "measure_latencies", lambda fns, **kw: (timed.append(sorted(fns)), real(fns, **kw))[1])
    again = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), tmp_path / "out", progress=False)
    assert again["stages"]["ran"] == []  # nothing trained or evaluated again...
    assert timed == [sorted(v["name"] for v in first["variants"])]  # ...but every candidate timed, in one interleaved call
    for v in again["variants"]:
        assert 0 < v["latency_ms_low"] <= v["latency_ms_p50"] <= v["latency_ms_high"]
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
    assert resumed["chosen"] == uninterrupted["chosen"]


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
    several = load_optimized(out).search(["black maxi dress", "jeans", "a long flowing summer dress for a wedding"], k=3)
    assert [len(t) for t in several] == [3, 3, 3]
    # fresh services, nothing cached: row-wise int8 quantizes each token on its own, so batch-mates change nothing
    pd.testing.assert_frame_equal(several[0], load_optimized(out).search("black maxi dress", k=3), rtol=0, atol=1e-6)
    for bad, error in [("", ValueError), ("   ", ValueError), (None, TypeError), ([None], TypeError)]:
        with pytest.raises(error, match="empty|must be a string"):
            engine.search(bad)
    stale = tmp_path / "stale"
    shutil.copytree(current_export(out), stale)
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
    from recbook.cli import main
    assert main(["search", str(out), "dress", "-k", "2", "--columns", "item_id,snippet,category"]) == 0  # the id is always shown
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


def test_rerun_reuses_its_export_version_and_a_new_choice_adds_one(finished, tiny_encoder, own_table, tmp_path):
    out, first = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    assert first["export"] == "models/v1" and (copy / "models" / "CURRENT").read_text().strip() == "v1"
    fastest = "static query encoder"  # under fixed_latencies; a rule that cannot choose the first run's model:
    other = dict(budget_ms=1e6, static=False) if first["chosen"] == fastest else dict(budget_ms=1e-6)
    slow = optimize(config_for(tiny_encoder, own_table, **other), copy, progress=False)
    assert slow["chosen"] != first["chosen"] and slow["export"] == "models/v2"
    assert load_optimized(copy).meta["chosen"] == slow["chosen"]
    assert json.loads((copy / "models" / "v1" / "search.json").read_text())["chosen"] == first["chosen"]  # v1 kept
    again = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), copy, progress=False)
    assert again["export"] == "models/v1" and load_optimized(copy).meta["chosen"] == first["chosen"]
    assert sorted(p.name for p in (copy / "models").iterdir()) == ["CURRENT", "v1", "v2"]
    with pytest.raises(FileExistsError, match="never replaces"):
        export_search(copy / "stages", None, copy / "models" / "v1", {})


def test_a_folder_of_the_users_is_never_touched(tiny_encoder, own_table, tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    for name, text in [("report.md", "my notes"), ("results.json", "{}"), ("pareto.png", "not a png"),
                       ("model/weights.bin", "precious")]:
        (mine / name).write_text(text)
    before = digest(mine)
    with pytest.raises(OutputFolderError, match="not written by `recbook optimize`.*new or empty folder"):
        optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), mine, progress=False)
    assert digest(mine) == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        claim_run_folder(tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_killed_runs_temporaries_are_cleaned_and_nothing_else(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    dead = 2**22 + 12345  # above Linux's largest pid: no such process
    debris = [copy / "stages" / f".student-1-abc.{dead}.tmp", copy / "models" / f".v9.{dead}.tmp"]
    for folder in debris:
        folder.mkdir(); (folder / "half.bin").write_text("...")
    (copy / f".pareto.png.{dead}.tmp").write_text("half")
    (copy / f".report.md.k3x9q.{dead}.tmp").write_text("half")  # atomic_write_text's names end in the pid too
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another process, still writing
    try:
        (copy / "stages" / f".int8-abc.{live.pid}.tmp").mkdir()
        (copy / f".results.json.a1b2.{live.pid}.tmp").write_text("in flight")
        (copy / "notes.tmp").write_text("the user's"); (copy / f".mine.{dead}.tmp").write_text("the user's")
        (copy / ".pareto.png.tmp").write_text("no pid: kept")
        claim_run_folder(copy)
        assert not any(p.exists() for p in debris) and not (copy / f".pareto.png.{dead}.tmp").exists()
        assert not (copy / f".report.md.k3x9q.{dead}.tmp").exists()
        assert (copy / "stages" / f".int8-abc.{live.pid}.tmp").is_dir() and (copy / f".results.json.a1b2.{live.pid}.tmp").exists()
        assert (copy / "notes.tmp").read_text() == (copy / f".mine.{dead}.tmp").read_text() == "the user's"
        assert (copy / ".pareto.png.tmp").exists()
    finally:
        live.kill(); live.wait()


def candidates_table(p50, half, quality, size_mb):
    names = ["teacher", "2-layer distilled", "1-layer distilled", "1-layer distilled + int8"]
    p50, half = np.asarray(p50, float), np.asarray(half, float)
    return pd.DataFrame({"valid_ndcg@10": quality, "size_mb": size_mb, "latency_ms_p50": p50,
                         "latency_ms_low": p50 - half, "latency_ms_high": p50 + half}, index=pd.Index(names, name="name"))


@settings(max_examples=200, deadline=None)
@given(jitter=st.lists(st.floats(-0.95, 0.95), min_size=4, max_size=4),
       rule=st.sampled_from([dict(budget_ms=8.0), dict(), dict(lam=0.002), dict(budget_ms=1.0)]))
def test_the_choice_stays_put_when_latencies_move_within_their_noise(jitter, rule):
    from recbook.pipeline import _select
    center, half = np.array([30.0, 10.0, 5.6, 5.5]), np.array([3.0, 1.0, 0.6, 0.6])
    quality, size = [0.44, 0.48, 0.47, 0.47], [86.7, 36.1, 30.3, 13.5]
    expected = {8.0: "1-layer distilled + int8", None: "1-layer distilled + int8", 1.0: "1-layer distilled + int8"}
    chosen, why = _select(candidates_table(center + np.asarray(jitter) * half, half, quality, size), load_config(**rule))
    if "lam" in rule:
        assert chosen == "2-layer distilled" and why["rule"] == "lambda"  # ties within noise go to the more accurate
    else:
        assert chosen == expected[rule.get("budget_ms")]  # equal quality within the budget: the smaller file
        assert why["met"] == (rule.get("budget_ms") != 1.0)


def test_selection_reports_ties_and_how_close_it_came_to_the_budget():
    from recbook.pipeline import _noise_notes, _select
    table = candidates_table([30.0, 10.0, 5.6, 5.5], [3.0, 1.0, 0.6, 0.6], [0.44, 0.48, 0.47, 0.47], [86.7, 36.1, 30.3, 13.5])
    chosen, why = _select(table, load_config(budget_ms=9.5))
    assert chosen == "1-layer distilled + int8" and why["within_noise"] == ["1-layer distilled"]
    assert why["borderline"] == ["2-layer distilled"] and why["budget_used"] == pytest.approx(5.5 / 9.5)
    notes = " ".join(_noise_notes(table.assign(latency_ms_p95=table["latency_ms_p50"] * [1, 1, 1, 4]),
                                  {"selection": why, "chosen": chosen}))
    assert "Within noise of 1-layer distilled" in notes and "58% of the budget" in notes
    assert "over the budget within noise: 2-layer distilled" in notes and "spread several times the median" in notes


@pytest.mark.parametrize("script", ["cjk", "cyrillic"])
def test_a_foreign_table_is_measured_on_the_queries_the_report_states(script, tiny_encoder, tmp_path):
    from test_foreign_tables import reviews
    path = tmp_path / "table.csv.gz"
    reviews(script, per_item=24).drop(columns="stars").to_csv(path, index=False, sep=";")  # no rating column
    results = optimize(load_config(encoder=tiny_encoder, data=str(path), item="item", text="body", query="title",
                                   user="user", quick=True, sizes=SIZES, budget_ms=1e6), tmp_path / "out", progress=False)
    counts = results["task_counts"]
    assert 0 < results["valid_queries"] <= counts["valid"] and 0 < results["test_queries"] <= counts["test"]
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert f"{results['valid_queries']} validation and {results['test_queries']} test queries measured" in report
    assert results["example_query"] in report and load_optimized(tmp_path / "out").search(results["example_query"], k=3)["item_id"].str.len().eq(5).all()


def test_a_table_whose_queries_name_nothing_stops_before_training(tiny_encoder, tmp_path):
    from recbook.data import DataError
    table = pd.DataFrame({"item": [f"{i % 12:03d}" for i in range(240)], "body": [f"review {i} of a thing" for i in range(240)],
                          "title": ["great"] * 240})
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="Too few queries name an item"):
        optimize(load_config(encoder=tiny_encoder, data=str(tmp_path / "t.csv"), item="item", text="body", query="title",
                             quick=True, sizes=SIZES), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "stages").exists()  # no stage ran: nothing trained on zero pairs


def test_current_names_only_a_version_and_a_damaged_version_is_not_reused(finished, tiny_encoder, own_table, tmp_path):
    out, first = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for name in ("../../elsewhere", "/etc", "", "v1/../v1x"):
        (copy / "models" / "CURRENT").write_text(name)
        with pytest.raises(ValueError, match="not a version"):
            load_optimized(copy)
    (copy / "models" / "CURRENT").write_text("v1\n")
    (copy / "models" / "v1" / "catalogue.safetensors").write_bytes(b"broken")
    again = optimize(config_for(tiny_encoder, own_table, budget_ms=1e6), copy, progress=False)
    assert again["chosen"] == first["chosen"] and again["export"] == "models/v2"  # running again repairs it
    assert load_optimized(copy).meta["chosen"] == first["chosen"]


def test_equally_accurate_candidates_go_to_the_clearly_faster_else_the_smaller():
    from recbook.pipeline import _select
    quality, size = [0.44, 0.48, 0.48, 0.40], [86.7, 36.1, 30.3, 13.5]
    apart = candidates_table([30.0, 4.0, 6.0, 2.0], [3.0, 0.3, 0.3, 0.2], quality, size)  # int8 slower beyond noise
    assert _select(apart, load_config(budget_ms=8.0))[0] == "2-layer distilled"
    close = candidates_table([30.0, 5.8, 6.0, 2.0], [3.0, 0.3, 0.3, 0.2], quality, size)  # within noise: the smaller file
    assert _select(close, load_config(budget_ms=8.0))[0] == "1-layer distilled"


def test_a_chosen_static_encoder_serves_queries_against_the_teachers_catalogue(finished, tiny_encoder, own_table, tmp_path):
    from recbook.queryside import StaticQueryEncoder
    out, first = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    fast = optimize(config_for(tiny_encoder, own_table, budget_ms=1e-6), copy, progress=False)  # no budget met: the fastest
    assert fast["chosen"] == "static query encoder" and "static" not in fast["stages"]["ran"]  # built by the first run
    service = load_optimized(copy)
    assert isinstance(service.encoder, StaticQueryEncoder)
    teacher = load_optimized(out) if first["chosen"] == "teacher" else None
    if teacher is not None:
        assert torch.equal(service.embeddings, teacher.embeddings)
    queries = ["black dress", "soft sweater that fits", "jeans"]
    alone = [service.search(q, k=5) for q in queries]
    for query, result in zip(queries, alone):
        expected = torch.topk(service.encoder.encode([query]) @ service.embeddings.T, 5).values[0]
        np.testing.assert_allclose(result["retrieval_score"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert [r["item_id"].tolist() for r in service.search(queries, k=5)] == [r["item_id"].tolist() for r in alone]
