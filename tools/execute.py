"""Execute chapters at full size, the way they are committed: top to bottom in place, then stamped, cleaned and exported.

    python tools/execute.py nbs/08b_autotune.ipynb [more notebooks...]

Each code cell gets `metadata.recbook.source` (a hash of the source it ran), and the notebook gets
`metadata.recbook` (when, on which CPU, with which torch). `tests/test_outputs.py` then fails if a cell of a
stamped notebook is edited without executing the chapter again, so a committed output always comes from the
code beside it. Run it on a quiet machine: the chapters measure time.
"""
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_hash(source) -> str:
    "A short hash of a cell's source (a string or the list of lines a notebook stores)."
    text = "".join(source) if isinstance(source, list) else source
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp(path: Path) -> None:
    "Record each code cell's source hash and the run's machine in the notebook, written atomically."
    sys.path.insert(0, str(ROOT))
    from recbook.core import cpu_details
    import torch
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell.setdefault("metadata", {})["recbook"] = {"source": source_hash(cell["source"])}
    cpu = cpu_details()
    nb["metadata"].pop("widgets", None)  # widget state of the tqdm bars: nothing a reader of the page can use
    nb["metadata"]["recbook"] = {"executed": datetime.date.today().isoformat(), "cpu": cpu["cpu"],
                                 "cpu_flags": cpu["cpu_flags"], "cpus": os.cpu_count(), "torch": torch.__version__}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def figures_missing(path: Path) -> list[str]:
    "Ids of the code cells that call plt.show() but hold no image output."
    nb = json.loads(path.read_text())
    return [cell.get("id", "?") for cell in nb["cells"] if cell["cell_type"] == "code"
            and "plt.show()" in "".join(cell["source"])
            and not any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))]


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    # full size, not the teaching size; and the kernel's own inline backend, so that figures land in the notebook
    # (an MPLBACKEND=Agg set for tests would make every plt.show() draw nothing)
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "MPLBACKEND")}
    for name in paths:
        path = Path(name).resolve()
        if not path.is_file() or path.suffix != ".ipynb":
            print(f"No notebook at {name}.", file=sys.stderr)
            return 2
        subprocess.run(["jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                        "--ExecutePreprocessor.timeout=-1", path.name], cwd=path.parent, env=env, check=True)
        missing = figures_missing(path)
        if missing:
            print(f"{path.name}: cells {missing} call plt.show() but show no figure; not stamped.", file=sys.stderr)
            return 1
        stamp(path)
        subprocess.run(["nbdev_clean", "--fname", str(path)], cwd=ROOT, check=True)
    subprocess.run(["nbdev_export"], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
