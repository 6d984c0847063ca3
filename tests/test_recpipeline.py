"Chapter 08a: `recbook optimize --task recommendation` end to end, its cache, its saved choice and its bad input."
import json

import numpy as np
import pandas as pd
import pytest
import torch

from recbook.cli import main
from recbook.compress import RowwiseInt8Linear
from recbook.recfast import SequenceServer
from recbook.recommend import SequenceRecommender, load_recommender as load_saved, save_recommender
from recbook.recpipeline import (RecommendationConfig, load_recommendation_task, load_recommender, optimize_recommendation,
                                 recommendation_config, recommendation_fingerprint)

TINY = {"epochs": 1, "train_users": None, "latency_users": 5}


def shop_log(users=40, items=30, seed=0) -> pd.DataFrame:
    "A shop's export: its own column names, dates as text, a title per product."
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01")
    rows = []
    for u in range(users):
        for day, item in enumerate(rng.choice(items, size=int(rng.integers(6, 12)), replace=False)):
            rows.append({"customer": f"c{u:02d}", "sku": f"{item:04d}", "bought": str(start + pd.Timedelta(days=day, hours=u)),
                         "title": f"product {item} in colour {item % 5}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def shop_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("shop") / "shop.csv"
    shop_log().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, shop_csv, tiny_encoder):
    out = tmp_path_factory.mktemp("runs") / "rec"
    config = RecommendationConfig(data=str(shop_csv), user="customer", item="sku", timestamp="bought", text=["title"],
                                  encoder=tiny_encoder, sizes=TINY)
    return out, config, optimize_recommendation(config, out, progress=False)


def test_dates_as_text_split_as_the_same_times_as_numbers(shop_csv):
    log = shop_log()
    numbers = log.assign(bought=pd.to_datetime(log["bought"]).astype("int64") // 10**9)
    numbers.to_csv(shop_csv.with_name("numeric.csv"), index=False)
    by_date = load_recommendation_task(RecommendationConfig(data=str(shop_csv), user="customer", item="sku", timestamp="bought"))
    by_number = load_recommendation_task(RecommendationConfig(data=str(shop_csv.with_name("numeric.csv")), user="customer",
                                                              item="sku", timestamp="bought"))
    for split in ("valid", "test"):
        assert by_date.targets(split)["item_id"].tolist() == by_number.targets(split)["item_id"].tolist()


def test_the_fingerprint_follows_the_interactions(shop_csv, tmp_path):
    config = dict(user="customer", item="sku", timestamp="bought")
    task = load_recommendation_task(RecommendationConfig(data=str(shop_csv), **config))
    log = shop_log()
    log.loc[0, "sku"] = "0029" if log.loc[0, "sku"] != "0029" else "0028"
    log.to_csv(tmp_path / "changed.csv", index=False)
    changed = load_recommendation_task(RecommendationConfig(data=str(tmp_path / "changed.csv"), **config))
    assert recommendation_fingerprint(task) == recommendation_fingerprint(load_recommendation_task(RecommendationConfig(data=str(shop_csv), **config)))
    assert recommendation_fingerprint(task) != recommendation_fingerprint(changed)


def test_a_run_measures_every_candidate_and_saves_its_choice(run):
    out, _, results = run
    table = pd.DataFrame(results["variants"]).set_index("name")
    assert set(table.index) == {"teacher", "teacher int8", "student", "student int8"}
    assert results["chosen"] in table.index and results["task"] == "recommendation"
    assert (table["latency_ms_low"] <= table["latency_ms_p50"]).all() and (table["latency_ms_p50"] <= table["latency_ms_high"]).all()
    assert json.loads((out / "results.json").read_text())["chosen"] == results["chosen"]
    report = (out / "report.md").read_text()
    assert f"**{results['chosen']}**" in report and (out / "pareto.png").stat().st_size > 0
    assert sorted(results["stages"]["ran"]).count("measure") == 4 and {"text", "teacher", "student"} <= set(results["stages"]["ran"])


def test_the_saved_choice_serves_what_was_measured_and_never_a_seen_item(run):
    out, _, results = run
    recommender = load_recommender(out)
    assert recommender.serving["chosen"] == results["chosen"]
    assert any(isinstance(m, RowwiseInt8Linear) for m in recommender.model.modules()) == results["chosen"].endswith("int8")
    for user in recommender.histories["user_id"].unique()[:10]:
        history = recommender.history_of(user)
        top = recommender.recommend(user=user, k=5)["item_id"].tolist()
        assert len(top) == 5 and not set(top) & set(history)
        served = SequenceServer(recommender.model, k=5)(recommender.columns_of(history))
        assert recommender.items["item_id"].iloc[served].tolist() == top


def test_a_second_run_trains_nothing_and_applies_the_new_rule(run):
    out, config, first = run
    again = optimize_recommendation(RecommendationConfig(**{**config.__dict__, "budget_ms": 1000.0}), out, progress=False)
    assert again["stages"]["ran"] == [] and {"teacher", "student", "measure"} <= set(again["stages"]["reused"])
    assert again["selection"]["rule"] == "budget" and again["selection"]["met"]
    best = max(again["variants"], key=lambda row: row["valid_ndcg@10"])["valid_ndcg@10"]
    assert next(r for r in again["variants"] if r["name"] == again["chosen"])["valid_ndcg@10"] == best  # all fit in 1 s


def test_an_int8_choice_is_refused_by_the_fp32_loader_and_served_in_int8(tmp_path, run):
    out, _, _ = run
    task_model = load_saved(out / "recommender", as_saved=True)
    folder = tmp_path / "saved"
    task = load_recommendation_task(run[1])
    save_recommender(task_model.model, task, folder, serving={"int8": True})
    with pytest.raises(ValueError, match="int8"):
        load_saved(folder)
    served = load_recommender(folder)
    assert any(isinstance(m, RowwiseInt8Linear) for m in served.model.modules())
    assert not any(isinstance(m, RowwiseInt8Linear) for m in load_saved(folder, as_saved=True).model.modules())


def test_the_command_line_runs_resumes_and_answers(tmp_path, shop_csv, tiny_encoder, capsys):
    out = tmp_path / "cli"
    args = ["optimize", "--task", "recommendation", "--data", str(shop_csv), "--user", "customer", "--item", "sku",
            "--timestamp", "bought", "--text", "title", "--encoder", tiny_encoder, "--quick", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    chosen = json.loads((out / "results.json").read_text())["chosen"]
    assert f"chosen: {chosen}" in capsys.readouterr().out
    assert main(["recommend", str(out), "--user", "c03", "-k", "3"]) == 0
    shown = capsys.readouterr().out
    assert "# user c03" in shown and len(shown.strip().splitlines()) == 5  # the header line, the columns, 3 items
    assert main(["recommend", str(out), "--history", "0001,0002", "-k", "2"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--timestamp", "when"], "when"),                          # a column the table lacks
    (["--timestamp", "title"], "neither a number nor a date"),  # a column that is not time
    (["--timestamp", "bought", "--query", "q"], "--query"),     # a search flag on a recommendation run
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, shop_csv, capsys, extra, message):
    args = ["optimize", "--task", "recommendation", "--data", str(shop_csv), "--user", "customer", "--item", "sku",
            "--quick", "--out", str(tmp_path / "bad"), *extra]
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_a_search_run_folder_is_not_resumed_as_a_recommendation_run(tmp_path, shop_csv, capsys):
    out = tmp_path / "search-run"
    out.mkdir()
    (out / ".recbook-run").write_text("{}")
    (out / "results.json").write_text(json.dumps({"task": "search", "chosen": "teacher"}))
    args = ["optimize", "--task", "recommendation", "--data", str(shop_csv), "--user", "customer", "--item", "sku",
            "--timestamp", "bought", "--quick", "--out", str(out)]
    assert main(args) == 2
    assert "holds a search run" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["chosen"] == "teacher"  # untouched


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="Unknown config keys"):
        recommendation_config(query="q")
    with pytest.raises(ValueError, match="positive"):
        recommendation_config(budget_ms=-1)
    with pytest.raises(ValueError, match="Unknown sizes"):
        recommendation_config(sizes={"layers": 2})


def test_a_missing_encoder_folder_fails_before_any_training(tmp_path, shop_csv, capsys):
    args = ["optimize", "--task", "recommendation", "--data", str(shop_csv), "--user", "customer", "--item", "sku",
            "--timestamp", "bought", "--text", "title", "--encoder", str(tmp_path / "no-such-model"), "--quick",
            "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages").exists()
