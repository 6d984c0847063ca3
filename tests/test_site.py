"""The rendered book: build the site with mkdocs, serve it, open it in headless Chromium."""
import base64
import functools
import html.parser
import http.server
import io
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--hide-scrollbars"]

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
