"""`coca retrieve --html`: the results page names the model and each query, shows rank and score,
links every thumbnail to its full image by a relative URL (odd file names too) and works offline,
checked in headless Chromium on real photos; an --html path holding someone else's file is refused."""

import json
import os
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image

from conftest import PHOTOS, one_error_line, run_cli

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, which .ci/run installs
ODD_NAME = "a photo #1 ?100% été.jpg"
CAPTIONS = ["an astronaut in a white suit", "a tabby cat", "coffee in a cup", "a <script>alert(1)</script>"]


class PageParts(HTMLParser):
    """What a page links to and shows: every <a href>, every <img src> and the text."""

    def __init__(self, page: str):
        super().__init__()
        self.hrefs, self.sources, self.text = [], [], []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.hrefs.append(attrs["href"])
        elif tag == "img":
            self.sources.append(attrs["src"])

    def handle_data(self, data):
        self.text.append(data)


def linked_file(page: Path, href: str) -> Path:
    """The file a relative link of ``page`` leads to, as a browser resolves it."""
    assert not urlparse(href).scheme and not href.startswith("/"), href
    return Path(os.path.normpath(page.parent / unquote(href)))


@pytest.fixture
def site(photo_dir, tmp_path):
    """site/photos: the photos, a copy with an odd name and a truncated JPEG; site/report: where pages go."""
    photos = tmp_path / "site" / "photos"
    shutil.copytree(photo_dir, photos)
    shutil.copy(photo_dir / "chelsea.jpg", photos / ODD_NAME)
    (photos / "truncated.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes()[:2000])
    return tmp_path / "site"


# -- the page itself, without a browser -----------------------------------------------------------

def test_page_escapes_text_names_the_model_and_links_odd_names(site):
    from coca_cli.tasks.results_page import results_page
    from coca_cli.tasks.retrieval import Hit, Ranking

    photos = site / "photos"
    scary = photos / "<script>alert(1).jpg"
    shutil.copy(photos / "coffee.jpg", scary)
    hits = [Hit(1, 0.5, str(photos / ODD_NAME)), Hit(2, 0.25, str(scary)), Hit(3, -0.125, str(photos / "truncated.jpg"))]
    rankings = [Ranking('a <script>alert("x")</script> & "cat"', hits),
                Ranking(str(scary), [Hit(1, 0.75, "<b>bold</b> & co")], query_is_image=True)]
    page = results_page(rankings, "coca_<tiny>", "weights/<b>", site / "report")

    assert "<script" not in page and "<b>bold" not in page
    parts = PageParts(page)
    text = "".join(parts.text)
    for shown in ['a <script>alert("x")</script> & "cat"', "<b>bold</b> & co", str(scary), "coca_<tiny>",
                  "weights/<b>", "#1", "0.5000", "#2", "0.2500", "#3", "-0.1250", "0.7500"]:
        assert shown in text
    assert re.search(r"<title>coca retrieve: coca_&lt;tiny&gt;</title>", page)
    assert '<meta name="generator" content="coca retrieve">' in page
    assert parts.hrefs == ["../photos/a%20photo%20%231%20%3F100%25%20%C3%A9t%C3%A9.jpg",
                           "../photos/%3Cscript%3Ealert%281%29.jpg", "../photos/truncated.jpg",
                           "../photos/%3Cscript%3Ealert%281%29.jpg"]
    assert [linked_file(site / "report" / "p.html", href) for href in parts.hrefs] == [
        photos / ODD_NAME, scary, photos / "truncated.jpg", scary]
    assert len(parts.sources) == 3 and all(src.startswith("data:image/jpeg;base64,") for src in parts.sources)
    assert page.count('class="unreadable"') == 1  # the truncated file: a placeholder, still linked
    assert not re.search(r"https?:", page)


def test_html_path_holding_someone_elses_file_is_refused_before_the_model_loads(site, tmp_path, capsys):
    photo = site / "photos" / "coffee.jpg"
    theirs = tmp_path / "theirs.html"
    theirs.write_text("<!DOCTYPE html><html><body>my notes</body></html>")
    folder = tmp_path / "folder.html"
    folder.mkdir()
    for path, message in [(theirs, "exists and is not a page written by coca retrieve"),
                          (photo, "exists and is not a page written by coca retrieve"), (folder, "is a folder")]:
        before = path.read_bytes() if path.is_file() else None
        # a --pretrained that does not exist: the page is checked before any model is looked for
        assert run_cli("retrieve", "--images", photo, "--query", "a cup", "--html", path,
                       "--pretrained", tmp_path / "no-such-model") == 2
        assert f"--html {path} {message}" in one_error_line(capsys)
        assert before is None or path.read_bytes() == before


def test_coca_pages_and_empty_files_may_be_replaced(tmp_path):
    from coca_cli.tasks.results_page import check_page_file, write_results_page
    from coca_cli.tasks.retrieval import Hit, Ranking

    page = tmp_path / "hits.html"
    write_results_page(page, [Ranking("a cup", [Hit(1, 0.5, str(PHOTOS[0]))])], "coca_tiny", "native")
    check_page_file(page)
    earlier = tmp_path / "earlier.html"  # as coca wrote pages before they said so in a meta tag
    earlier.write_text('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>coca retrieve</title><style>')
    check_page_file(earlier)
    (tmp_path / "empty.html").touch()
    check_page_file(tmp_path / "empty.html")
    check_page_file(tmp_path / "new.html")


# -- the page in a browser, written by the command --------------------------------------------------

# Injected into a copy of the page beside it: once everything has loaded, record for each <img>
# whether it shows a picture, and each link's URL as the browser resolved it, where --dump-dom shows them.
PROBE = """<script>addEventListener("load", () => { document.body.dataset.probe = JSON.stringify({
  images: [...document.images].map(img => img.complete && img.naturalWidth > 0),
  links: [...document.links].map(a => a.href)}); });</script>"""


def render(page: Path, tmp_path: Path) -> dict:
    """The page as headless Chromium loads it: {"images": [loaded?...], "links": [absolute URL...]}."""
    if not CHROMIUM.exists():
        if os.environ.get("COCA_REQUIRE_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} is missing (install Debian's chromium package; .ci/run does)")
        pytest.skip(f"{CHROMIUM} is missing")
    probed = page.with_name("probed-" + page.name)
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    profile = tmp_path / f"chromium-profile-{page.stem}"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    probed.unlink()
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, dom[-2000:]
    return json.loads(unescape(found.group(1)))


def check_in_browser(page: Path, tmp_path: Path, thumbnails: int) -> None:
    """Every thumbnail shows, every link leads to a file, nothing is fetched from the network."""
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?:", text)
    shown = render(page, tmp_path)
    assert shown["images"] == [True] * thumbnails
    hrefs = PageParts(text).hrefs
    assert len(shown["links"]) == len(hrefs) == thumbnails  # each thumbnail links to its image
    for url, href in zip(shown["links"], hrefs):
        assert url.startswith("file://"), url
        target = Path(unquote(urlparse(url).path))
        assert target.is_file() and target == linked_file(page, href), (url, href)


def test_pages_load_whole_in_chromium_and_move_with_the_photos(tiny, site, tmp_path, capsys):
    photos, report = site / "photos", site / "report"
    queries = ["a cat on a sofa", 'a <script>alert("x")</script> & co']
    assert run_cli("retrieve", "--images", photos, "--query", queries[0], "--query", queries[1], "--top-k", "10",
                   "--json", "--html", report / "images.html", "--pretrained", tiny[1]) == 1  # the truncated file
    captured = capsys.readouterr()
    rankings = [json.loads(line) for line in captured.out.splitlines()]
    assert captured.err.splitlines()[-1] == "coca: error: 1 of 7 images could not be read"
    assert f"wrote {report / 'images.html'}" in captured.err

    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    assert run_cli("retrieve", "--texts", texts, "--image", photos / ODD_NAME, "--image", photos / "rocket.png",
                   "--top-k", "2", "--json", "--html", report / "texts.html", "--pretrained", tiny[1]) == 0
    texts_for = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    moved = shutil.move(site, tmp_path / "moved")  # the page and its photos, together somewhere else
    images_page, texts_page = Path(moved) / "report" / "images.html", Path(moved) / "report" / "texts.html"
    text = "".join(PageParts(images_page.read_text(encoding="utf-8")).text)
    assert "coca_tiny" in text and str(tiny[1]) in text
    for query, ranking in zip(queries, rankings):
        assert query in text and len(ranking["hits"]) == 6
        for hit in ranking["hits"]:
            assert f"#{hit['rank']}" in text and f"{hit['score']:.4f}" in text and hit["image"] in text
    check_in_browser(images_page, tmp_path, thumbnails=12)
    assert "../photos/a%20photo%20%231%20%3F100%25%20%C3%A9t%C3%A9.jpg" in PageParts(images_page.read_text()).hrefs

    text = "".join(PageParts(texts_page.read_text(encoding="utf-8")).text)
    assert [ranking["image"] for ranking in texts_for] == [str(photos / ODD_NAME), str(photos / "rocket.png")]
    for ranking in texts_for:
        assert ranking["image"] in text
        for hit in ranking["hits"]:
            assert f"{hit['rank']}{hit['score']:.4f}{hit['text']}" in text  # one table row: rank, score, text
    check_in_browser(texts_page, tmp_path, thumbnails=2)  # the query images, shown and linked
