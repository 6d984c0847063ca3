"""Committed outputs come from the code beside them: a chapter executed by tools/execute.py carries a hash of each
code cell's source, and editing a cell afterwards without executing the chapter again fails here."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))
spec = importlib.util.spec_from_file_location("execute", ROOT / "tools" / "execute.py")
execute = importlib.util.module_from_spec(spec)
spec.loader.exec_module(execute)


def stale_cells(nb: dict) -> list[str]:
    "Code cells of a stamped notebook whose source is not the one their outputs came from (or that never ran)."
    return [c.get("id", "?") for c in nb["cells"] if c["cell_type"] == "code"
            and c.get("metadata", {}).get("recbook", {}).get("source") != execute.source_hash(c["source"])]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_stamped_chapter_holds_the_outputs_of_its_own_code(path):
    nb = json.loads(path.read_text())
    run = nb["metadata"].get("recbook")
    if run is None:
        pytest.skip(f"{path.name} was executed before chapters were stamped (tools/execute.py)")
    assert {"executed", "cpu", "cpu_flags"} <= set(run)
    stale = stale_cells(nb)
    assert not stale, (f"{path.name}: cells {stale} changed after the chapter was executed on {run['executed']}; "
                       f"run python tools/execute.py {path.relative_to(ROOT)} and commit the result")
    blank = execute.figures_missing(path)
    assert not blank, (f"{path.name}: cells {blank} call plt.show() but hold no figure (executed with a non-inline "
                       f"matplotlib backend); run python tools/execute.py {path.relative_to(ROOT)}")


def test_the_check_sees_an_edited_cell_and_a_new_one(tmp_path):
    nb = {"metadata": {}, "cells": [{"cell_type": "markdown", "source": ["# prose"], "metadata": {}},
                                    {"cell_type": "code", "id": "a1", "source": ["x = 1\n", "print(x)"], "metadata": {},
                                     "outputs": []}]}
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(nb))
    execute.stamp(path)
    stamped = json.loads(path.read_text())
    assert stale_cells(stamped) == [] and stamped["metadata"]["recbook"]["cpu"]
    stamped["cells"][1]["source"] = ["x = 2\n", "print(x)"]  # edited after execution
    stamped["cells"].append({"cell_type": "code", "id": "b2", "source": ["y = 3"], "metadata": {}, "outputs": []})
    assert stale_cells(stamped) == ["a1", "b2"]
    assert execute.source_hash(["x = 1\n", "print(x)"]) == execute.source_hash("x = 1\nprint(x)")


def test_the_check_sees_a_figure_that_was_not_drawn(tmp_path):
    drawn = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": ["<Figure>"]}, "metadata": {}}
    cells = [{"cell_type": "code", "id": i, "source": ["plt.plot([1, 2])\n", "plt.show()"], "metadata": {}, "outputs": o}
             for i, o in (("drawn", [drawn]), ("blank", []))]
    cells.append({"cell_type": "code", "id": "text", "source": ["print(1)"], "metadata": {}, "outputs": []})
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps({"metadata": {}, "cells": cells}))
    assert execute.figures_missing(path) == ["blank"]


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if "## Summary" in p.read_text()], ids=lambda p: p.stem)
def test_a_chapter_ends_with_references_and_a_chinese_summary(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown"]
    headings = [line.strip() for c in cells for line in "".join(c["source"]).splitlines() if line.startswith("## ")]
    assert "## References" in headings, f"{path.name} has no references"
    assert headings[-1] == "## 中文小结", f"{path.name} does not end with its Chinese summary"
    chinese = "".join(cells[-1]["source"]).split("## 中文小结", 1)[1]
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in chinese) > 150, f"{path.name}: the Chinese summary is too short"
