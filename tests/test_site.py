"""The rendered book: build the site with mkdocs, serve it, open it in headless Chromium with no network."""
import base64
import functools
import html.parser
import http.server
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The browser reaches the local server only: every other host goes to a closed proxy port and resolves to nothing,
# so a page that still needs a CDN shows it here as it would on a reader's offline machine.
OFFLINE = ["--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
           "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--hide-scrollbars", *OFFLINE]
SETTLE = "--virtual-time-budget=20000"  # let MathJax load its fonts and typeset before the DOM is read
MATH_CHAPTERS = ("01_objective", "02a_metrics")

pytest.importorskip("mkdocs_jupyter", reason='the site needs the docs extra: pip install -e ".[docs]"')
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium), as .ci/run installs")


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.images = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("img", "script", "link") and (attrs.get("src") or attrs.get("href")):
            (self.images if tag == "img" else self.links).append(attrs.get("src") or attrs.get("href"))


class Loads(html.parser.HTMLParser):
    "What a page loads to display itself (scripts, stylesheets, fonts, icons, images), not the links a reader follows."
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "video", "audio", "embed") and attrs.get("src"):
            self.urls.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") != "canonical":
            self.urls.append(attrs["href"])


class VisibleText(html.parser.HTMLParser):
    "The text a reader sees as prose: not scripts or styles, not code, not MathJax's own output."
    SKIP = {"script", "style", "noscript", "template", "textarea", "pre", "code", "mjx-container"}

    def __init__(self, skip=SKIP):
        super().__init__()
        self.skip, self.depth, self.parts = skip, 0, []

    def handle_starttag(self, tag, attrs):
        self.depth += tag in self.skip

    def handle_endtag(self, tag):
        self.depth -= tag in self.skip and self.depth > 0

    def handle_data(self, data):
        if not self.depth and data.strip():
            self.parts.append(data)


def visible_text(page: str, skip=VisibleText.SKIP) -> str:
    parser = VisibleText(skip)
    parser.feed(page)
    return "\n".join(parser.parts)


class NavTitles(html.parser.HTMLParser):
    "The navigation's text for each page link: {href: title}."
    def __init__(self):
        super().__init__()
        self.titles, self.href = {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "md-nav__link" in (attrs.get("class") or ""):
            self.href = attrs.get("href")
            self.titles.setdefault(self.href, "")

    def handle_endtag(self, tag):
        if tag == "a":
            self.href = None

    def handle_data(self, data):
        if self.href is not None:
            self.titles[self.href] = " ".join((self.titles[self.href] + " " + data).split())


def heading(nb: Path) -> str:
    "A notebook's H1 as plain text: no code ticks, emphasis or link targets."
    for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
        lines = "".join(cell["source"]).splitlines() if cell["cell_type"] == "markdown" else []
        for line in lines:
            if line.startswith("# "):
                text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", line[2:])
                return " ".join(text.replace("`", "").replace("*", "").split())
    raise AssertionError(f"{nb.name} has no H1")


RAW_TEX = re.compile(r"\$\$|\$[^$\s][^$]*\$|\\\(|\\\[|\\(?:frac|lambda|theta|sum|min|log)\b")
EXTERNAL = re.compile(r"^(?:https?:)?//", re.I)
CSS_EXTERNAL = re.compile(r"(?:@import\s+(?:url\()?|url\()\s*['\"]?(?:https?:)?//", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    import build_site
    assert build_site.main([]) == 0
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(build_site.SITE))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield build_site, build_site.SITE, f"http://127.0.0.1:{server.server_address[1]}", tmp_path_factory.mktemp("shots")
    server.shutdown()


def chromium(*args, timeout=120):
    user_dir = Path(__import__("tempfile").mkdtemp())
    try:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        shutil.rmtree(user_dir, ignore_errors=True)


def test_every_chapter_and_module_has_a_page_in_order(site):
    build_site, out, _, _ = site
    chapters = [nb.stem for nb in build_site.chapters()]
    assert chapters == sorted(chapters) and "00_core" in chapters and "08_pipeline" in chapters
    for name in chapters:
        assert (out / name / "index.html").is_file(), name
    for module in build_site.modules():
        page = (out / "api" / f"recbook.{module}" / "index.html").read_text()
        assert f"recbook.{module}" in page and ("doc-function" in page or "doc-class" in page), module
    index = (out / "index.html").read_text()
    positions = [index.find(f"{name}/") for name in chapters]
    assert -1 not in positions and positions == sorted(positions)  # navigation in chapter order


def test_the_chinese_readme_is_a_page_linked_both_ways(site):
    _, out, _, _ = site
    page = (out / "zh-CN" / "index.html").read_text()
    assert "章节地图" in page and "08_pipeline/" in page  # the chapter map, its chapters linked into the site
    assert 'href="zh-CN/"' in (out / "index.html").read_text() and 'href="../"' in page


def test_internal_links_resolve(site):
    _, out, _, _ = site
    broken = []
    for page in out.rglob("*.html"):
        parser = Links()
        parser.feed(page.read_text(errors="replace"))
        for link in parser.links:
            url = urlparse(link)
            if url.scheme or url.netloc or link.startswith(("#", "mailto:", "data:")):
                continue
            path = unquote(url.path)
            target = (out / path.lstrip("/") if path.startswith("/") else page.parent / path).resolve() if path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(out)} -> {link}")
    assert not broken, broken[:20]


def test_chapter_pages_render_their_plots_in_chromium(site):
    import matplotlib.image as mpimg
    _, out, url, _ = site
    for chapter in ("01_objective", "04_compression"):
        done = chromium("--dump-dom", f"{url}/{chapter}/")
        assert done.returncode == 0, done.stderr[-500:]
        parser = Links()
        parser.feed(done.stdout)
        plots = [src for src in parser.images if src.startswith("data:image/png;base64,")]
        assert plots, f"no plot on {chapter}"
        image = mpimg.imread(io.BytesIO(base64.b64decode(plots[0].split(",", 1)[1])), format="png")
        assert image.shape[0] > 100 and image.std() > 0.01  # a real picture, not an empty box


def test_index_page_screenshot(site):
    import matplotlib.image as mpimg
    _, _, url, shots = site
    shot = shots / "index.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1280,900", f"{url}/")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-500:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (900, 1280) and pixels.std() > 0.05  # text and navigation, not a blank page
    shutil.copy(shot, ROOT / "_site" / "screenshot-index.png")


def test_the_browser_has_no_network(site):
    done = chromium("--dump-dom", "https://example.com/", timeout=60)
    assert "Example Domain" not in done.stdout  # the other tests' CDN checks mean something only offline


def test_math_renders_offline(site):
    _, _, url, _ = site
    for chapter in MATH_CHAPTERS:
        done = chromium(SETTLE, "--dump-dom", f"{url}/{chapter}/")
        assert done.returncode == 0, done.stderr[-500:]
        assert done.stdout.count("<mjx-container") > 10, f"MathJax typeset nothing on {chapter}"
        raw = RAW_TEX.findall(visible_text(done.stdout))
        assert not raw, f"{chapter} shows raw TeX: {raw[:10]}"


def test_code_cells_show_code_only(site):
    build_site, out, _, _ = site
    for nb in build_site.chapters():
        text = visible_text((out / nb.stem / "index.html").read_text(encoding="utf-8"),
                            skip={"script", "style", "noscript", "template"})  # code included this time
        assert "#|" not in text, f"{nb.stem} shows nbdev directives"
        assert not re.search(r"(In|Out)\s*\[\s*\]:", text), f"{nb.stem} shows empty prompts"
    assert "#| export" in (build_site.ROOT / "nbs" / "01_objective.ipynb").read_text()  # nbdev's source untouched


def test_navigation_shows_every_full_chapter_title(site):
    build_site, out, _, _ = site
    parser = NavTitles()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    for nb in build_site.chapters():
        assert parser.titles.get(f"{nb.stem}/") == heading(nb), nb.stem
    assert parser.titles["08_pipeline/"].endswith("recbook optimize")


def test_pages_load_nothing_from_other_hosts(site):
    _, out, _, _ = site
    found = []
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8", errors="replace")
        parser = Loads()
        parser.feed(text)
        found += [f"{page.relative_to(out)}: {url}" for url in parser.urls if EXTERNAL.match(url)]
        found += [f"{page.relative_to(out)}: {m}" for m in re.findall(r"import\(\s*['\"](?:https?:)?//[^'\"]+", text)]
        found += [f"{page.relative_to(out)}: {m}" for m in CSS_EXTERNAL.findall(text)]
    for sheet in out.rglob("*.css"):
        found += [f"{sheet.relative_to(out)}: {m}" for m in CSS_EXTERNAL.findall(sheet.read_text(errors="replace"))]
    assert not found, found[:20]


# Loads a chapter in a same-origin frame and counts the code cells and outputs whose lines overflow sideways.
WRAP_PROBE = """<!doctype html><html><body><iframe id="page" src="/{chapter}/" style="width:1280px;height:900px"></iframe>
<script>
document.getElementById("page").onload = () => setTimeout(() => {{
  const cells = [...document.getElementById("page").contentDocument.querySelectorAll(".jupyter-wrapper pre")];
  document.body.dataset.cells = cells.length;
  document.body.dataset.wide = cells.filter(pre => pre.scrollWidth > pre.clientWidth + 1).length;
}}, 500);
</script></body></html>"""


def test_long_code_lines_wrap(site):
    _, out, url, _ = site
    for chapter in ("01_objective", "02_data"):  # both have code lines of 120+ characters
        probe = out / f"_wrap_probe_{chapter}.html"
        probe.write_text(WRAP_PROBE.format(chapter=chapter))
        try:
            done = chromium(SETTLE, "--dump-dom", f"{url}/{probe.name}")
        finally:
            probe.unlink()
        found = re.search(r'<body data-cells="(\d+)" data-wide="(\d+)"', done.stdout)
        assert found and int(found[1]) > 5, done.stdout[-500:]
        assert found[2] == "0", f"{found[2]} of {found[1]} code cells or outputs of {chapter} scroll sideways"


def test_chapter_screenshot_shows_typeset_math(site):
    import matplotlib.image as mpimg
    _, _, url, shots = site
    shot = shots / "01_objective.png"
    done = chromium(SETTLE, f"--screenshot={shot}", "--window-size=1280,1600", f"{url}/01_objective/")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-500:]
    assert mpimg.imread(shot).std() > 0.05
    shutil.copy(shot, ROOT / "_site" / "screenshot-01_objective.png")
