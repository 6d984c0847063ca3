"""Build the book as a static website with mkdocs (Quarto cannot be installed offline; see README).

nbdev stays the source of truth: this script only stages what mkdocs reads into `_site_src/` (the committed,
executed notebooks, the README as the home page, one API page per exported module), then runs `mkdocs build`.

    python tools/build_site.py            # -> _site/index.html
    python tools/build_site.py --serve    # build, then serve on http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE, SITE = ROOT / "_site_src", ROOT / "_site"


def chapters() -> list[Path]:
    "The notebooks in reading order (their file names are numbered)."
    return sorted((ROOT / "nbs").glob("[0-9]*.ipynb"))


def modules() -> list[str]:
    "The exported modules, in the order of the chapters that write them."
    found = []
    for nb in chapters():
        for name in re.findall(r"#\|\s*default_exp\s+(\w+)", nb.read_text(encoding="utf-8")):
            if (ROOT / "recbook" / f"{name}.py").is_file() and name not in found:
                found.append(name)
    return found


def _title(nb: Path) -> str:
    "The notebook's first level-1 heading, without markup."
    for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
        for line in "".join(cell["source"]).splitlines() if cell["cell_type"] == "markdown" else []:
            if line.startswith("# "):
                return line[2:].replace("`", "").strip()
    return nb.stem


def _docstring(module: str) -> str:
    tree = ast.parse((ROOT / "recbook" / f"{module}.py").read_text(encoding="utf-8"))
    return (ast.get_docstring(tree) or "").split("\n")[0]


def stage(out: Path = SOURCE) -> dict:
    "Copy the notebooks and README, write the API pages, return the navigation."
    shutil.rmtree(out, ignore_errors=True)
    (out / "api").mkdir(parents=True)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme = re.sub(r"`?nbs/(\w+)\.ipynb`?", r"[\1](\1.ipynb)", readme)  # chapter table -> links into the site
    (out / "index.md").write_text(readme, encoding="utf-8")
    book, api = [], []
    for nb in chapters():
        shutil.copy2(nb, out / nb.name)
        book.append({_title(nb): nb.name})
    for module in modules():
        (out / "api" / f"recbook.{module}.md").write_text(
            f"# recbook.{module}\n\n{_docstring(module)}\n\n::: recbook.{module}\n", encoding="utf-8")
        api.append({f"recbook.{module}": f"api/recbook.{module}.md"})  # not api/index.md: a module may be named index
    return {"nav": [{"Home": "index.md"}, {"The book": book}, {"API reference": api}]}


def write_config(nav: dict, path: Path = ROOT / "_site_src.yml") -> Path:
    "mkdocs.yml (committed) plus the generated navigation."
    import yaml
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    config.update(nav, docs_dir=str(SOURCE), site_dir=str(SITE))
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", action="store_true", help="serve the built site on 127.0.0.1:8000")
    args = parser.parse_args(argv)
    try:
        import mkdocs  # noqa: F401
        import mkdocs_jupyter  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as error:
        print(f"The site needs the docs extra: pip install -e \".[docs]\" ({error})", file=sys.stderr)
        return 2
    config = write_config(stage())
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--clean", "-q", "-f", str(config)], cwd=ROOT, env=env)
    if done.returncode != 0:
        return done.returncode
    print(f"site built in {SITE}")
    if args.serve:
        subprocess.run([sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", str(SITE)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
