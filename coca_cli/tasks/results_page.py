"""`coca retrieve --html`: a results page to look at, share and keep.

One file that works offline (thumbnails inlined as data: URIs, no script, nothing fetched), whose
links to the full images are relative to the page's folder, so the page and the images can be
moved or copied together. It names the model and every query, and shows each hit's rank and score.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Optional, Sequence
from urllib.parse import quote

from ..errors import CocaError
from ..files import atomic_write

if TYPE_CHECKING:
    from .retrieval import Ranking

GENERATOR = '<meta name="generator" content="coca retrieve">'  # how coca knows a page of its own
_EARLIER_PAGE = '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>coca retrieve</title>'  # before the meta
THUMBNAIL_SIZE = 160

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
header p{color:#555}section{margin-bottom:2.5em}h2{font-size:1.1em}
.hits{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;width:170px;font-size:.85em;word-break:break-all}
img{max-width:160px;max-height:160px;display:block;border:1px solid #ccc}
.rank{font-weight:bold;margin-right:.6em}
.score{font-variant-numeric:tabular-nums;color:#555}
table{border-collapse:collapse;margin-top:.8em}td,th{padding:.2em .8em;text-align:left;vertical-align:top}
.unreadable{width:160px;height:100px;background:#eee;display:flex;align-items:center;justify-content:center}"""


def check_page_file(path: Optional[Path]) -> None:
    """Refuse (exit 2, before any model loads) an ``--html`` path that holds something other than a
    page coca wrote: a folder, a photo, someone's own HTML is never replaced. An empty file is anyone's."""
    if path is None or not path.exists():
        return
    if path.is_dir():
        raise CocaError(f"--html {path} is a folder; give a file name")
    if not path.is_file():
        raise CocaError(f"--html {path} is not a regular file; give a file name")
    try:
        with open(path, "rb") as file:
            head = file.read(4096).decode("utf-8", errors="replace")
    except OSError as err:
        raise CocaError(f"cannot read --html {path}: {err.strerror or err}") from None
    if head and GENERATOR not in head and not head.startswith(_EARLIER_PAGE):
        raise CocaError(f"--html {path} exists and is not a page written by coca retrieve: not replacing it "
                        "(move it away or choose another name)")


def write_results_page(path: Path, rankings: Sequence["Ranking"], model: str, pretrained: str) -> None:
    """Write the page for ``rankings`` to ``path`` whole (through a temporary file) or not at all."""
    page = results_page(rankings, model, pretrained, Path(path).parent)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def results_page(rankings: Sequence["Ranking"], model: str, pretrained: str, folder: Path) -> str:
    """The page's HTML; links are relative to ``folder``, where the page is to be written."""
    esc = html.escape
    sections = "\n".join(_section(ranking, folder) for ranking in rankings)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n{GENERATOR}\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>coca retrieve: {esc(model)}</title><style>{_STYLE}</style></head>\n"
            f'<body><header><h1>coca retrieve</h1><p>model <b class="model">{esc(model)}</b>, '
            f'pretrained <b class="pretrained">{esc(pretrained)}</b></p></header>\n{sections}\n</body></html>\n')


def image_href(image: Path, folder: Path) -> str:
    """``image``'s URL relative to ``folder``, percent-encoded: spaces, ``#``, ``?``, ``%``, ``:`` and
    non-ASCII letters in file names all lead to the file."""
    relative = PurePath(os.path.relpath(os.path.abspath(image), os.path.abspath(folder)))
    return quote(relative.as_posix(), safe="/")


def thumbnail_uri(path: Path, size: int = THUMBNAIL_SIZE) -> Optional[str]:
    """A small JPEG of the image, turned upright as a browser shows it, as a data: URI; None when
    the file cannot be read (any more)."""
    from PIL import ImageOps

    from ..data.transforms import ImageLoadError, load_image

    try:
        image = ImageOps.exif_transpose(load_image(path)).convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except (ImageLoadError, OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _linked_thumbnail(path: str, folder: Path) -> str:
    """The thumbnail (or a placeholder when the image cannot be read), linking to the full image."""
    esc = html.escape
    uri = thumbnail_uri(Path(path))
    picture = ('<span class="unreadable">unreadable</span>' if uri is None
               else f'<img src="{uri}" alt="{esc(Path(path).name)}" title="{esc(path)}">')
    return f'<a href="{esc(image_href(Path(path), folder))}">{picture}</a>'


def _section(ranking: "Ranking", folder: Path) -> str:
    esc = html.escape
    if ranking.query_is_image:
        rows = "".join(f'<tr><td class="rank">{h.rank}</td><td class="score">{h.score:.4f}</td>'
                       f"<td>{esc(h.item)}</td></tr>" for h in ranking.hits)
        return (f"<section><h2>texts for the image {esc(ranking.query)}</h2>"
                f"<figure>{_linked_thumbnail(ranking.query, folder)}</figure>"
                f"<table><tr><th>#</th><th>score</th><th>text</th></tr>{rows}</table></section>")
    figures = "".join(f"<figure>{_linked_thumbnail(h.item, folder)}<figcaption>"
                      f'<span class="rank">#{h.rank}</span><span class="score">{h.score:.4f}</span><br>'
                      f"{esc(h.item)}</figcaption></figure>" for h in ranking.hits)
    return f'<section><h2>images for “{esc(ranking.query)}”</h2><div class="hits">{figures}</div></section>'
