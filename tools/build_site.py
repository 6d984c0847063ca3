"""Build the book as a static website with mkdocs (Quarto cannot be installed offline; see README).

nbdev stays the source of truth: this script only stages what mkdocs reads into `_site_src/` (copies of the
committed, executed notebooks without nbdev's `#|` directives, the README as the home page, one API page per
exported module, MathJax and the book's stylesheet), then runs `mkdocs build`.

The site works without a network: MathJax comes from the npm package `mathjax` (fetched once with `npm pack`
into RECBOOK_SITE_CACHE, default ~/.cache/recbook/site-assets, never committed) and is served from the site.

    python tools/build_site.py            # -> _site/index.html
    python tools/build_site.py --serve    # build, then serve on http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE, SITE = ROOT / "_site_src", ROOT / "_site"
CACHE = Path(os.environ.get("RECBOOK_SITE_CACHE", Path.home() / ".cache" / "recbook" / "site-assets"))
MATHJAX = "mathjax@3.2.2"  # version 3 ships its fonts inside the package; version 4 loads them from another one
MATHJAX_SHA512 = "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
# What the pages load: the TeX/MathML-to-HTML component, its fonts, the TeX extensions it autoloads (\cancel,
# \boldsymbol, ...) and what its right-click menu loads on demand; the rest of the package (SVG output, node) is unused.
MATHJAX_PARTS = ["tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y", "sre"]

# MathJax reads the notebooks' own delimiters ($...$, $$...$$) as well as arithmatex's \(...\) in Markdown pages.
MATHJAX_CONFIG = r"""window.MathJax = {
  tex: {inlineMath: [["$", "$"], ["\\(", "\\)"]], displayMath: [["$$", "$$"], ["\\[", "\\]"]],
        processEscapes: true, processEnvironments: true}
};
"""
# Long lines in code cells and their outputs wrap, so a reader never scrolls a cell sideways.
BOOK_CSS = """.jupyter-wrapper .highlight-ipynb pre, .jupyter-wrapper .jp-OutputArea pre, .md-typeset pre > code {
  white-space: pre-wrap;
  overflow-wrap: anywhere;
}
"""


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


class AssetError(RuntimeError):
    "A site asset is neither cached nor fetchable; the message is the one line a reader needs."


def _npm_reason(stderr: str) -> str:
    "The line of npm's error report that says what went wrong (not its codes, stack or log path)."
    noise = ("code ", "syscall ", "errno ", "at ", "A complete log", "}")
    lines = [line.removeprefix("npm error").strip() for line in stderr.splitlines() if line.startswith("npm error")]
    return next((line for line in lines if line and not line.startswith(noise)), "no tarball written")


def _npm_pack(spec: str, into: Path) -> Path:
    "Download an npm package's tarball with npm itself (which checks the registry's checksum)."
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError(f"{spec} is not in {CACHE} and npm is not installed: install Node.js/npm once "
                         f"(apt-get install npm) or set RECBOOK_SITE_CACHE to a folder that has it")
    done = subprocess.run([npm, "pack", spec, "--loglevel=error", "--pack-destination", str(into)],
                          capture_output=True, text=True, timeout=300)
    tarballs = list(into.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        raise AssetError(f"could not fetch {spec} from the npm registry into {CACHE} ({_npm_reason(done.stderr)}); "
                         f"build once with access to the registry, later builds work offline")
    return tarballs[0]


def _check_sha512(tarball: Path, expected: str) -> None:
    "The tarball is the one the book was checked with."
    found = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if found != expected:
        raise AssetError(f"{tarball.name} has sha512 {found}, expected {expected}")


def mathjax() -> Path:
    "MathJax's es5/ folder in the cache, fetched from npm the first time only."
    folder = CACHE / MATHJAX.replace("@", "-")
    if (folder / "es5" / "tex-mml-chtml.js").is_file():
        return folder / "es5"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tarball = _npm_pack(MATHJAX, Path(tmp))
        _check_sha512(tarball, MATHJAX_SHA512)
        with tarfile.open(tarball) as archive:
            archive.extractall(tmp, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        (Path(tmp) / "package").rename(folder)  # in one step, so a broken download never looks cached
    return folder / "es5"


def write_assets(out: Path) -> None:
    "MathJax, its configuration and the book's stylesheet, served from the site itself."
    source = mathjax()
    for part in MATHJAX_PARTS:
        copy = shutil.copytree if (source / part).is_dir() else shutil.copy2
        (out / "assets" / "mathjax" / part).parent.mkdir(parents=True, exist_ok=True)
        copy(source / part, out / "assets" / "mathjax" / part)
    (out / "assets" / "javascripts").mkdir(parents=True, exist_ok=True)
    (out / "assets" / "javascripts" / "mathjax-config.js").write_text(MATHJAX_CONFIG, encoding="utf-8")
    (out / "assets" / "stylesheets").mkdir(parents=True, exist_ok=True)
    (out / "assets" / "stylesheets" / "book.css").write_text(BOOK_CSS, encoding="utf-8")


def _directives(source: str) -> list[str]:
    "nbdev's `#|` directive names in a code cell (export, default_exp, hide, ...)."
    return [line.lstrip()[2:].strip().split(" ")[0].rstrip(":") for line in source.splitlines()
            if line.lstrip().startswith("#|")]


def _reader_cell(cell: dict) -> dict | None:
    "A code cell as a reader should see it: no `#|` lines, no widget views; None if nothing is left to show."
    source = "".join(cell["source"])
    if "hide" in _directives(source):
        return None
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#|")).strip("\n")
    if not code and not cell.get("outputs"):
        return None  # `#| default_exp x` alone: a note to nbdev, nothing for the reader
    for output in cell.get("outputs", []):
        # tqdm bars need the jupyter-widgets scripts from a CDN; their text/plain copy reads the same offline
        output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
    return {**cell, "source": code}


def stage_notebook(nb: Path, out: Path) -> None:
    "The site's copy of a chapter; the notebook in nbs/ stays nbdev's source, untouched."
    book = json.loads(nb.read_text(encoding="utf-8"))
    cells = [cell if cell["cell_type"] != "code" else _reader_cell(cell) for cell in book["cells"]]
    book["cells"] = [cell for cell in cells if cell is not None]
    book["metadata"].pop("widgets", None)
    (out / nb.name).write_text(json.dumps(book, ensure_ascii=False, indent=1), encoding="utf-8")


READMES = {"README.md": "index.md", "README.zh-CN.md": "zh-CN.md"}  # the README files, and their pages in the site


def stage(out: Path = SOURCE) -> dict:
    "Copy the notebooks and README, write the API pages and assets, return the navigation."
    shutil.rmtree(out, ignore_errors=True)
    (out / "api").mkdir(parents=True)
    write_assets(out)
    for source, page in READMES.items():  # the English README is the home page, the Chinese one its sibling
        readme = (ROOT / source).read_text(encoding="utf-8")
        readme = re.sub(r"`?nbs/(\w+)\.ipynb`?", r"[\1](\1.ipynb)", readme)  # chapter table -> links into the site
        for other, other_page in READMES.items():
            readme = readme.replace(f"]({other})", f"]({other_page})")
        (out / page).write_text(readme, encoding="utf-8")
    book, api = [], []
    for nb in chapters():
        stage_notebook(nb, out)
        book.append({_title(nb): nb.name})
    for module in modules():
        (out / "api" / f"recbook.{module}.md").write_text(
            f"# recbook.{module}\n\n{_docstring(module)}\n\n::: recbook.{module}\n", encoding="utf-8")
        api.append({f"recbook.{module}": f"api/recbook.{module}.md"})  # not api/index.md: a module may be named index
    return {"nav": [{"Home": "index.md"}, {"中文": READMES["README.zh-CN.md"]}, {"The book": book}, {"API reference": api}]}


# nbconvert puts a Mermaid loader on every notebook page that imports mermaid.js from cdnjs when the page has a
# diagram; the book draws none, and a page of the book never reaches for a CDN.
MERMAID_LOADER = re.compile(r'<script type="module">\s*document\.addEventListener\("DOMContentLoaded", async \(\) => \{'
                            r'\s*const diagrams = document\.querySelectorAll\("\.jp-Mermaid.*?</script>', re.S)


def drop_mermaid_loaders(site: Path = SITE) -> None:
    "Remove nbconvert's Mermaid loader from the pages that have no diagram."
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        if 'class="jp-Mermaid' not in text and MERMAID_LOADER.search(text):
            page.write_text(MERMAID_LOADER.sub("", text), encoding="utf-8")


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
    try:
        config = write_config(stage())
    except AssetError as error:
        print(f"build_site: {error}", file=sys.stderr)
        return 2
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--clean", "-q", "-f", str(config)], cwd=ROOT, env=env)
    if done.returncode != 0:
        return done.returncode
    drop_mermaid_loaders()
    print(f"site built in {SITE}")
    if args.serve:
        subprocess.run([sys.executable, "-m", "http.server", "8000", "--bind", "127.0.0.1", "-d", str(SITE)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
