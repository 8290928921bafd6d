"""The HTML of a report: escaping, tables, figures linked as `img/NAME`, and the page
around the sections (styles inline, no external URL, a small self-check script).
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from PIL import Image

__all__ = ["Raw", "Section", "e", "facts", "figure", "page", "table"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Raw(str):
    """HTML that its builder has already escaped."""

    __slots__ = ()


@dataclass(frozen=True)
class Section:
    """One part of the page: a title, its HTML (escaped by its builder) and the pictures
    it links as `img/NAME` (NAME -> PNG bytes)."""

    title: str
    body: str
    images: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        return _SAFE.sub("-", self.title.lower()).strip("-")


def e(value: object) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value))


def table(head: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> Raw:
    cells = "".join(f"<th>{e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{e(cls)}"' if cls else ""
    return Raw(f"<table{attr}><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")


def facts(rows: Iterable[tuple[str, object]]) -> Raw:
    """A two-column table of named values, the names as row headers."""
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return Raw(f'<table class="facts"><tbody>{body}</tbody></table>')


def figure(images: dict[str, bytes], name: str, png: bytes, caption: str) -> Raw:
    """Keep `png` as img/NAME and link it with its natural size (no layout shift)."""
    name = _SAFE.sub("_", name)
    images[name] = png
    with Image.open(io.BytesIO(png)) as picture:
        width, height = picture.size
    return Raw(
        f'<figure><img src="img/{quote(name)}" width="{width}" height="{height}" '
        f'alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
    )


_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;
color:#222}h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd}
code{font-size:13px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}table.facts th{font-weight:normal}figure{margin:12px 0}
.figures{display:flex;flex-wrap:wrap;gap:0 16px;align-items:flex-start}
img{max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #eee}
figcaption{color:#555;font-size:13px}#missing{color:#b00}nav a{margin-right:12px}
details{margin:8px 0}summary{cursor:pointer}
"""
# A self-check any reader benefits from (a warning when img/ was not copied along) and
# that a headless browser reads back from the DOM: images loaded, errors seen.
_WATCH = (
    "<script>window.actmapErrors=0;"
    'window.addEventListener("error",function(){window.actmapErrors+=1;},true);</script>'
)
_CHECK = """<script>
window.addEventListener("load", function () {
  var all = Array.prototype.slice.call(document.images);
  var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = String(ok);
  document.body.dataset.imagesTotal = String(all.length);
  document.body.dataset.errors = String(window.actmapErrors);
  document.getElementById("missing").hidden = ok === all.length;
});
</script>"""


def page(title: str, subtitle: str, footer: str, sections: Sequence[Section]) -> str:
    """The whole document: a heading, links to each section, the sections, a footer."""
    nav = "".join(f'<a href="#{s.anchor}">{e(s.title)}</a>' for s in sections)
    parts = "".join(
        f'<section id="{s.anchor}"><h2>{e(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style>{_WATCH}'
        f'</head><body><h1>{e(title)}</h1><p>{e(subtitle)}</p><p id="missing" hidden>Some '
        "pictures did not load: keep the img/ folder beside index.html.</p>"
        f"<nav>{nav}</nav>{parts}<footer><p>{e(footer)}</p></footer>{_CHECK}</body></html>\n"
    )
