"""The `recbook` console script."""
import json
import subprocess
import sys

import recbook
from recbook.cli import BENCHMARKS, build_parser, main


def run(*args):
    return subprocess.run([sys.executable, "-m", "recbook.cli", *args], capture_output=True, text=True, timeout=300)


def test_version_and_env(capsys):
    out = subprocess.run(["recbook", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"recbook {recbook.__version__}"
    assert main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] and info["torch_threads"] >= 1 and info["transformers"].startswith("5.")


def test_every_benchmark_module_has_bench():
    import importlib
    for name, module in BENCHMARKS.items():
        assert callable(importlib.import_module(module).bench), name


def test_unknown_benchmark_is_rejected(capsys):
    import pytest
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_bench_objective_quick_writes_its_json(tmp_path, capsys):
    from recbook.core import load_results
    assert main(["bench", "objective", "--quick", "--out", str(tmp_path)]) == 0
    rows, rest = load_results(tmp_path / "objective.json")
    names = {r.name for r in rows}
    assert {"loss:naive", "loss:bounded", "loss:log_likelihood"} <= names
    assert rest["chosen"] in names and set(rest["frontier"]) <= names and rest["quick"] is True
    losses = {r.name: r for r in rows if r.name.startswith("loss:")}
    # the naive loss has no floor, the sound ones do
    assert losses["loss:naive"].extra["final_loss"] < -1
    assert losses["loss:log_likelihood"].extra["final_loss"] >= 0


def test_setup_wordnet_from_a_given_archive(tmp_path, monkeypatch, capsys):
    from test_data import _fake_wordnet_archive
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path / "cache"))
    archive = _fake_wordnet_archive(tmp_path / "wn.tar.gz", {n: b"x\r\n" for n in ("data.noun", "index.noun", "lexnames")})
    assert main(["setup", "wordnet", "--archive", str(archive)]) == 0
    assert "ready" in capsys.readouterr().out
    assert (tmp_path / "cache" / "nltk_data" / "corpora" / "wordnet" / "lexnames").read_bytes() == b"x\n"
