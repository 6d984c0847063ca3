"""Bad input, everywhere a user can give it: one line naming the problem and the fix, exit status 2 on the command
line or a named exception in Python, never a traceback, and never a changed byte in the user's own files."""
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from recbook.cli import main
from recbook.pipeline import (OutputFolderError, claim_run_folder, current_export, export_search, load_config,
                              load_optimized, optimize)

SIZES = {"train_queries": 32, "eval_queries": 20, "layers": [1], "repeats": 3}


class Evil:
    "An object whose unpickling would run a command: what a tampered checkpoint holds."
    def __reduce__(self):
        return (os.system, ("echo owned > /tmp/recbook-owned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_encoder, own_table):
    "A finished run and a folder of the user's own files (data, config, notes), each with its bytes' hash."
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    optimize(load_config(encoder=tiny_encoder, data=str(own_table), item="sku", text="body", query="headline",
                         rating="stars", item_features=["category"], quick=True, sizes=SIZES), run, progress=False)
    user = root / "user"
    user.mkdir()
    shutil.copy(own_table, user / "mine.csv")
    (user / "notes").mkdir()
    (user / "notes" / "report.md").write_text("my own notes")
    (user / "run.toml").write_text('quick = true\nbudget_ms = 50\n')
    (user / "broken.toml").write_text("quick = [")
    (user / "unknown.toml").write_text("epochs = 3\n")
    (user / "empty.csv").write_bytes(b"")
    (user / "header_only.csv").write_text("sku,body,headline,stars\n")
    (user / "garbage.csv").write_bytes(bytes(range(256)) * 20)
    (user / "a-file").write_text("not a folder")
    (user / "not-a-tar.tar.gz").write_text("hello")
    with tarfile.open(user / "empty.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("README"); info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    return {"run": run, "user": user, "encoder": tiny_encoder}


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def broken_copy(world, tmp_path, breaks) -> str:
    "A copy of the finished run whose current export `breaks(export_folder)` damages."
    copy = tmp_path / "run"
    shutil.copytree(world["run"], copy)
    breaks(current_export(copy))
    return str(copy)


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def model_file(export: Path) -> Path:
    "The weights file of a saved model, whichever format it was saved in."
    return next(p for p in sorted((export / "model").rglob("*")) if p.suffix in (".safetensors", ".pt"))


def edit_items(export: Path):
    items = pd.read_parquet(export / "items.parquet")
    items.loc[0, "document"] = "something else"
    items.to_parquet(export / "items.parquet")


OPTIMIZE = ["optimize", "--quick", "--no-progress"]

CLI_CASES = {  # name: (arguments built from the world and a fresh tmp_path, the message that must be shown)
    # recbook search
    "search: no such folder": (lambda w, t: ["search", str(t / "nope"), "dress"], "not a folder written by"),
    "search: a file, not a folder": (lambda w, t: ["search", str(w["user"] / "a-file"), "dress"], "not a folder written by"),
    "search: a folder of the user's": (lambda w, t: ["search", str(w["user"] / "notes"), "dress"], "not a folder written by"),
    "search: empty query": (lambda w, t: ["search", str(w["run"]), ""], "empty"),
    "search: blank query": (lambda w, t: ["search", str(w["run"]), "   "], "empty"),
    "search: one blank among good": (lambda w, t: ["search", str(w["run"]), "dress", " "], "empty"),
    "search: k zero": (lambda w, t: ["search", str(w["run"]), "dress", "-k", "0"], "must be a whole number >= 1"),
    "search: k negative": (lambda w, t: ["search", str(w["run"]), "dress", "-k", "-3"], "must be a whole number >= 1"),
    "search: k not a number": (lambda w, t: ["search", str(w["run"]), "dress", "-k", "ten"], "invalid _positive value"),
    "search: unknown column, beside the id": (lambda w, t: ["search", str(w["run"]), "dress", "--columns", "item_id,price"],
                                              "not in the catalogue"),
    "search: unknown column": (lambda w, t: ["search", str(w["run"]), "dress", "--columns", "price"], "not in the catalogue"),
    "search: invalid UTF-8 query": (lambda w, t: ["search", str(w["run"]), b"caf\xe9".decode("utf-8", "surrogateescape")],
                                    "not valid UTF-8"),
    "search: no query": (lambda w, t: ["search", str(w["run"])], "the following arguments are required"),
    "search: broken search.json": (lambda w, t: ["search", broken_copy(w, t, lambda e: (e / "search.json").write_text("{oops")),
                                                 "dress"], "search.json is not readable JSON"),
    "search: empty search.json": (lambda w, t: ["search", broken_copy(w, t, lambda e: (e / "search.json").write_text("")),
                                                "dress"], "search.json is not readable JSON"),
    "search: search.json holds a list": (lambda w, t: ["search", broken_copy(w, t, lambda e: (e / "search.json").write_text("[]")),
                                                       "dress"], "search.json is not readable JSON"),
    "search: truncated model": (lambda w, t: ["search", broken_copy(w, t, lambda e: truncate(model_file(e))), "dress"],
                                "cannot be loaded"),
    "search: empty model file": (lambda w, t: ["search", broken_copy(w, t, lambda e: model_file(e).write_bytes(b"")), "dress"],
                                 "cannot be loaded"),
    "search: model file deleted": (lambda w, t: ["search", broken_copy(w, t, lambda e: model_file(e).unlink()), "dress"],
                                   "cannot be loaded"),
    "search: a pickle where safetensors belongs": (lambda w, t: ["search", broken_copy(w, t, lambda e: model_file(e).write_bytes(
        pickle.dumps({"weights": Evil()}))), "dress"], "cannot be loaded"),
    "search: broken tokenizer.json": (lambda w, t: ["search", broken_copy(w, t, lambda e: next(
        (e / "model").rglob("tokenizer.json")).write_text("{not json")), "dress"], "cannot be loaded"),
    "search: broken recbook.json": (lambda w, t: ["search", broken_copy(w, t, lambda e: (e / "model" / "recbook.json").write_text("{")),
                                                  "dress"], "cannot be loaded"),
    "search: truncated items": (lambda w, t: ["search", broken_copy(w, t, lambda e: truncate(e / "items.parquet")), "dress"],
                                "items.parquet cannot be loaded"),
    "search: truncated catalogue": (lambda w, t: ["search", broken_copy(w, t, lambda e: truncate(e / "catalogue.safetensors")),
                                                  "dress"], "catalogue.safetensors cannot be read"),
    "search: catalogue missing": (lambda w, t: ["search", broken_copy(w, t, lambda e: (e / "catalogue.safetensors").unlink()),
                                                "dress"], "incomplete"),
    "search: edited catalogue": (lambda w, t: ["search", broken_copy(w, t, edit_items), "dress"], "different catalogue"),
    "search: CURRENT names a missing version": (lambda w, t: ["search", broken_copy(w, t, lambda e: shutil.rmtree(e)), "dress"],
                                                "missing or incomplete"),
    # recbook optimize: checked before any long work
    "optimize: --out is a file": (lambda w, t: [*OPTIMIZE, "--out", str(w["user"] / "a-file")], "is a file"),
    "optimize: --out holds the user's files": (lambda w, t: [*OPTIMIZE, "--out", str(w["user"] / "notes")],
                                               "not written by `recbook optimize`"),
    "optimize: --out is the user's data folder": (lambda w, t: [*OPTIMIZE, "--out", str(w["user"])],
                                                  "not written by `recbook optimize`"),
    "optimize: --out cannot be written": (lambda w, t: [*OPTIMIZE, "--out", "/proc/version/run"], "Cannot write the run folder"),
    "optimize: no such data file": (lambda w, t: [*OPTIMIZE, "--data", str(t / "nope.csv"), "--out", str(t / "o")], "No data file"),
    "optimize: data is a folder": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "notes"), "--out", str(t / "o")], "No data file"),
    "optimize: unknown item column": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "mine.csv"), "--item", "nope",
                                                    "--text", "body", "--query", "headline", "--out", str(t / "o")], "nope"),
    "optimize: unknown text column": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "mine.csv"), "--item", "sku",
                                                    "--text", "review", "--query", "headline", "--out", str(t / "o")], "review"),
    "optimize: unknown feature column": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "mine.csv"), "--item", "sku",
                                                       "--text", "body", "--query", "headline", "--item-features", "brand",
                                                       "--out", str(t / "o")], "brand"),
    "optimize: empty data file": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "empty.csv"), "--item", "sku",
                                                "--text", "body", "--query", "headline", "--out", str(t / "o")], "empty|no data|No columns"),
    "optimize: header only": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "header_only.csv"), "--item", "sku",
                                            "--text", "body", "--query", "headline", "--out", str(t / "o")], "No interactions|no rows|empty"),
    "optimize: binary garbage": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "garbage.csv"), "--item", "sku",
                                               "--text", "body", "--query", "headline", "--out", str(t / "o")],
                                 "lacks the columns|corrupt"),
    "optimize: unknown encoding": (lambda w, t: [*OPTIMIZE, "--data", str(w["user"] / "mine.csv"), "--encoding", "klingon",
                                                 "--item", "sku", "--text", "body", "--query", "headline", "--out", str(t / "o")],
                                   "klingon"),
    "optimize: zero budget": (lambda w, t: [*OPTIMIZE, "--budget-ms", "0", "--out", str(t / "o")], "positive"),
    "optimize: negative budget": (lambda w, t: [*OPTIMIZE, "--budget-ms", "-5", "--out", str(t / "o")], "positive"),
    "optimize: budget not a number": (lambda w, t: [*OPTIMIZE, "--budget-ms", "fast", "--out", str(t / "o")], "invalid float"),
    "optimize: two rules": (lambda w, t: [*OPTIMIZE, "--budget-ms", "5", "--lam", "0.1"], "not allowed with"),
    "optimize: zero speed-up": (lambda w, t: [*OPTIMIZE, "--speedup", "0", "--out", str(t / "o")], "positive"),
    "optimize: NaN budget": (lambda w, t: [*OPTIMIZE, "--budget-ms", "nan", "--out", str(t / "o")], "positive"),
    "optimize: seed not a number": (lambda w, t: [*OPTIMIZE, "--seed", "x"], "invalid int"),
    "optimize: no such config": (lambda w, t: [*OPTIMIZE, "--config", str(t / "run.toml")], "Could not read the config file"),
    "optimize: broken config": (lambda w, t: [*OPTIMIZE, "--config", str(w["user"] / "broken.toml")], "Could not read the config file"),
    "optimize: unknown config key": (lambda w, t: [*OPTIMIZE, "--config", str(w["user"] / "unknown.toml")], "Unknown config keys"),
    "optimize: augmenter that changes labels": (lambda w, t: [*OPTIMIZE, "--augment", "antonym", "--out", str(t / "o")],
                                                "label-preserving"),
    "optimize: unknown augmenter": (lambda w, t: [*OPTIMIZE, "--augment", "telepathy", "--out", str(t / "o")], "label-preserving"),
    "optimize: no such encoder folder": (lambda w, t: [*OPTIMIZE, "--encoder", str(t / "no-such-model"), "--out", str(t / "o")],
                                         "no such folder"),
    "optimize: encoder folder without a model": (lambda w, t: [*OPTIMIZE, "--encoder", str(w["user"] / "notes"),
                                                               "--out", str(t / "o")], "not a Hugging Face model folder"),
    "optimize: unknown flag": (lambda w, t: [*OPTIMIZE, "--epochs", "3"], "unrecognized arguments"),
    # the rest of the command line
    "no command": (lambda w, t: [], "required: command"),
    "unknown command": (lambda w, t: ["train"], "invalid choice"),
    "bench: unknown chapter": (lambda w, t: ["bench", "nope"], "invalid choice"),
    "setup: unknown resource": (lambda w, t: ["setup", "glove"], "invalid choice"),
    "setup: no such archive": (lambda w, t: ["setup", "wordnet", "--archive", str(t / "wn.tar.gz")], "not a readable .tar.gz"),
    "setup: archive is not a tar": (lambda w, t: ["setup", "wordnet", "--archive", str(w["user"] / "not-a-tar.tar.gz")], "not a readable .tar.gz"),
    "setup: archive without WordNet": (lambda w, t: ["setup", "wordnet", "--archive", str(w["user"] / "empty.tar.gz")], "holds no complete wordnet-3.0"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_command_line_refuses_bad_input_in_one_line(name, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RECBOOK_CACHE", str(tmp_path / "cache"))  # setup cases must not touch the real cache
    before, run_before = digest(world["user"]), digest(world["run"])
    arguments, message = CLI_CASES[name]
    try:
        code = main(arguments(world, tmp_path))
    except SystemExit as stop:  # argparse stops with status 2
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (name, err)
    assert err and "\n" not in err and "Traceback" not in err, err
    assert "weights_only=False" not in err and not Path("/tmp/recbook-owned").exists()
    import re
    assert re.search(message, err), (message, err)
    assert digest(world["user"]) == before and digest(world["run"]) == run_before  # nothing of theirs, or ours, changed


def test_the_real_command_exits_2_with_one_line(world):
    "The installed entry point, as a shell calls it, with bytes that are not UTF-8 in its arguments."
    run = lambda *a: subprocess.run([sys.executable, "-m", "recbook.cli", *a], capture_output=True, timeout=300)
    for args, message in [((str(world["run"]), b"caf\xe9 dress"), b"not valid UTF-8"),
                          ((str(world["user"] / "notes"), b"dress"), b"not a folder written by")]:
        done = run("search", *args)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count(b"\n") == 1, done.stderr


API_CASES = {  # name: (a call, the exception it must raise, the message)
    "load_optimized: no such folder": (lambda w, t: load_optimized(t / "nope"), ValueError, "not a folder written by"),
    "load_optimized: broken search.json": (lambda w, t: load_optimized(broken_copy(
        w, t, lambda e: (e / "search.json").write_text("{"))), ValueError, "not readable JSON"),
    "load_optimized: a pickle where safetensors belongs": (lambda w, t: load_optimized(broken_copy(
        w, t, lambda e: model_file(e).write_bytes(pickle.dumps(Evil())))), ValueError, "cannot be loaded"),
    "search: empty query": (lambda w, t: load_optimized(w["run"]).search(""), ValueError, "empty"),
    "search: None": (lambda w, t: load_optimized(w["run"]).search(None), TypeError, "must be a string"),
    "search: a list holding None": (lambda w, t: load_optimized(w["run"]).search(["dress", None]), TypeError, "must be a string"),
    "optimize: the user's folder": (lambda w, t: optimize(load_config(quick=True), w["user"] / "notes", progress=False),
                                    OutputFolderError, "not written by"),
    "claim_run_folder: a file": (lambda w, t: claim_run_folder(w["user"] / "a-file"), OutputFolderError, "is a file"),
    "export_search: over an existing folder": (lambda w, t: export_search(t, None, w["user"] / "notes", {}),
                                               FileExistsError, "never replaces"),
    "load_config: unknown key": (lambda w, t: load_config(epochs=3), ValueError, "Unknown config keys"),
    "load_config: unknown size": (lambda w, t: load_config(sizes={"batch": 3}), ValueError, "Unknown sizes"),
    "load_config: two rules": (lambda w, t: load_config(budget_ms=5, lam=0.1), ValueError, "at most one"),
    "load_config: no data file": (lambda w, t: load_config(data=str(t / "x.csv")), FileNotFoundError, "No data file"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_python_api_raises_named_errors(name, world, tmp_path):
    before = digest(world["user"])
    call, error, message = API_CASES[name]
    with pytest.raises(error, match=message):
        call(world, tmp_path)
    assert digest(world["user"]) == before


def test_there_are_at_least_sixty_cases():
    assert len(CLI_CASES) + len(API_CASES) + 1 >= 60
