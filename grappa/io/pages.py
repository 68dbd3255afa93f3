"""Self-contained HTML pages: ``grappa search --html`` and ``grappa serve`` (each query beside its
neighbours) and evaluate's ``report.html`` (the tables, plots, galleries, an embedding map and the
clusters). Pictures inline (nothing fetched, no files beside the page), every string from the data
escaped. In retrieval people judge results by looking at them."""
from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path

import numpy as np

from grappa.io.artifacts import atomic_path
from grappa.io.sources import ImageDecodeError, decode_image
from grappa.io.storage import StorageError, read_bytes

THUMB = 160  # the longest side of a thumbnail, in pixels; the aspect ratio is kept
SMALL_THUMB = 96  # map tooltips and cluster members: many of them in one page

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

# the map's tooltip: the thumbnail (a data: URI from the page itself) and the caption as text, never markup
MAP_SCRIPT = """
(function () {
  var tip = document.getElementById('map-tip'), thumbs = JSON.parse(document.getElementById('map-thumbs').textContent);
  document.querySelectorAll('svg.map circle').forEach(function (dot) {
    dot.addEventListener('mouseenter', function (e) {
      tip.replaceChildren();
      var src = thumbs[+dot.dataset.i];
      if (src) { var img = document.createElement('img'); img.src = src; tip.appendChild(img); }
      var caption = document.createElement('div'); caption.textContent = dot.dataset.caption; tip.appendChild(caption);
      tip.style.display = 'block'; tip.style.left = (e.pageX + 14) + 'px'; tip.style.top = (e.pageY + 14) + 'px';
    });
    dot.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  });
})();
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } p.meta { color: #666; margin: 0 0 20px; font-size: 13px; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 8px; padding: 12px 16px; margin-bottom: 16px; }
h2 { font-size: 14px; margin: 0 0 10px; word-break: break-all; }
.row { display: flex; gap: 12px; align-items: flex-start; overflow-x: auto; }
figure { margin: 0; width: 168px; flex: none; }
figure.query { border-right: 2px solid #ddd; padding-right: 12px; width: 180px; }
.box { width: 160px; height: 160px; display: flex; align-items: center; justify-content: center;
       background: #f0f0f0; border-radius: 4px; }
.box img { max-width: 160px; max-height: 160px; }
.missing { color: #999; font-size: 12px; text-align: center; padding: 8px; }
figcaption { font-size: 12px; line-height: 1.35; margin-top: 4px; word-break: break-all; }
.score { font-weight: 600; } .muted { color: #777; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 14px; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img.figure { max-width: 100%; }
figure.right .box { outline: 3px solid #2e9e44; } figure.wrong .box { outline: 3px solid #d23c3c; }
.right { color: #2e9e44; font-weight: 700; } .wrong { color: #d23c3c; font-weight: 700; }
p.note { color: #666; font-size: 12px; margin: 12px 0 6px; } h2 + p.note { margin: -4px 0 10px; }
figure.small { width: 104px; } figure.small .box { width: 96px; height: 96px; } figure.small .box img { max-width: 96px; max-height: 96px; }
h3 { font-size: 13px; margin: 12px 0 6px; }
form.upload { font-size: 13px; } form.upload input[type=number] { width: 64px; }
p.error { color: #d23c3c; font-weight: 600; margin: 0; }
svg.map { background: #fff; border: 1px solid #eee; max-width: 100%; height: auto; }
svg.map circle { stroke: #fff; stroke-width: 0.6; cursor: pointer; } svg.map circle:hover { stroke: #000; stroke-width: 1.5; }
.legend { font-size: 12px; margin-top: 6px; } .key { margin-right: 14px; white-space: nowrap; }
.key i { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 5px; vertical-align: -1px; }
.tip { display: none; position: absolute; background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 6px;
       font-size: 12px; box-shadow: 0 2px 8px rgba(0,0,0,.15); pointer-events: none; max-width: 180px; word-break: break-all; }
.tip img { display: block; max-width: 160px; max-height: 160px; margin-bottom: 4px; }
"""


def thumbnail(uri: str, min_side: int, max_pixels: int, max_bytes: int, size: int = THUMB) -> str | None:
    """A data: URI of the image at ``uri`` shrunk to ``size`` pixels, or None when it cannot be read."""
    try:
        data = read_bytes(uri, max_bytes)
    except (OSError, StorageError):
        return None
    return thumbnail_of(data, min_side, max_pixels, size)


def thumbnail_of(data: bytes, min_side: int, max_pixels: int, size: int = THUMB) -> str | None:
    """:func:`thumbnail` of image bytes."""
    try:
        image = decode_image(data, min_side, max_pixels)
    except ImageDecodeError:
        return None
    return thumbnail_image(image, size)


def thumbnail_image(image, size: int = THUMB) -> str:
    """A decoded PIL image as a thumbnail data: URI (the image is left as it is)."""
    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(thumb: str | None, caption: list[str], css: str = "") -> str:
    picture = (f'<img src="{thumb}" alt="">' if thumb else '<div class="missing">could not be read</div>')
    return (f'<figure class="{css}"><div class="box">{picture}</div>'
            f'<figcaption>{"<br>".join(caption)}</figcaption></figure>')


def html_page(title: str, subtitle: str, body: str) -> str:
    """The page around ``body`` (already HTML): title, a grey subtitle, the shared style."""
    esc = html.escape
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><p class="meta">{esc(subtitle)}</p>'
            f'{body}</body></html>')


def png_inline(path: Path) -> str:
    """A PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def markdown_html(text: str) -> str:
    """The Markdown evaluate writes (titles, blank lines, pipe tables, **bold**) as HTML, escaped."""
    def inline(cell: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(cell.strip()))

    out, table = [], []

    def flush() -> None:
        if table:
            head, *rows = [[inline(c) for c in line.strip().strip("|").split("|")] for line in table
                           if not re.fullmatch(r"\|(\s*-+\s*\|)+", line.strip())]
            out.append("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
                       + "</tbody></table>")
            table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)


def run_report(title: str, subtitle: str, results_md: str, figures: list[tuple[str, Path]],
               sections: list[str] = ()) -> str:
    """evaluate's page: the results tables of both folds and the routing, each figure inline, then
    ``sections`` (already HTML: galleries, the map, the clusters)."""
    body = [f"<section>{markdown_html(results_md)}</section>"]
    body += [section(caption, f'<img class="figure" src="{png_inline(path)}" alt="">')
             for caption, path in figures if Path(path).is_file()]
    return html_page(title, subtitle, "".join(body + [s for s in sections if s]))


def search_page(title: str, subtitle: str, queries: list[dict], results: list[list[dict]]) -> str:
    """The page of ``grappa search --html``: per query (``uri``, ``thumb``) a row of its neighbours
    (see :func:`query_row`)."""
    return html_page(title, subtitle, "".join(
        section(query["uri"], query_row({**query, "caption": [Path(query["uri"]).name]}, hits))
        for query, hits in zip(queries, results)))


def upload_page(title: str, subtitle: str, top_k: int, max_top_k: int, result: str = "", error: str = "") -> str:
    """``grappa serve``'s page: a form to upload a query image, then ``result`` (a :func:`query_row`) or
    ``error`` (one line) below it."""
    form = (f'<section><form method="post" action="/" enctype="multipart/form-data" class="upload">'
            f'<label>query image <input type="file" name="image" accept="image/*" required></label> '
            f'<label>top k <input type="number" name="top_k" value="{top_k}" min="1" max="{max_top_k}"></label> '
            f'<button type="submit">search</button></form></section>')
    shown = f'<section><p class="error">{html.escape(error)}</p></section>' if error else result
    return html_page(title, subtitle, form + shown)


def query_row(query: dict, hits: list[dict]) -> str:
    """One query (``thumb``, ``caption`` lines) beside its neighbours (``rank``, ``score``, ``thumb``,
    ``image_id``, optional ``domain``/``label`` and ``correct``: a green or red mark)."""
    esc = html.escape
    figures = [_figure(query["thumb"], ["<b>query</b>", *map(esc, query["caption"])], "query")]
    for hit in hits:
        where = " / ".join(esc(str(hit[key])) for key in ("domain", "label") if hit.get(key))
        css = {True: "right", False: "wrong"}.get(hit.get("correct"), "")
        mark = f'<span class="{css}">{"✓" if hit["correct"] else "✗"}</span> ' if css else ""
        figures.append(_figure(hit["thumb"], [
            f'{mark}<span class="score">#{hit["rank"]} · {hit["score"]:.3f}</span>',
            esc(hit["image_id"]), f'<span class="muted">{where}</span>' if where else ""], css))
    return f'<div class="row">{"".join(figures)}</div>'


def section(heading: str, body: str, about: str = "") -> str:
    """A titled box; ``about``: a grey line under the title."""
    return f"<section><h2>{html.escape(heading)}</h2>{note(about) if about else ''}{body}</section>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def embedding_map(xy, groups: list[str], captions: list[str], thumbs: list[str | None], width: int = 760,
                  height: int = 520) -> str:
    """A 2-D map as inline SVG: one dot per image coloured by its group (a legend below), its thumbnail
    and caption on hover (a few lines of script; everything inline)."""
    xy = np.asarray(xy, dtype=float)
    pad = 12
    low, span = xy.min(axis=0), np.maximum(np.ptp(xy, axis=0), 1e-9)
    pos = pad + (xy - low) / span * [width - 2 * pad, height - 2 * pad]
    names = sorted(set(groups))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(names)}
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="{colour[g]}" data-i="{i}" '
                   f'data-caption="{html.escape(c)}"></circle>'
                   for i, ((x, y), g, c) in enumerate(zip(pos, groups, captions)))
    legend = "".join(f'<span class="key"><i style="background:{colour[g]}"></i>{html.escape(g)}</span>' for g in names)
    data = json.dumps(thumbs).replace("</", "<\\/")
    return (f'<svg class="map" viewBox="0 0 {width} {height}" width="{width}" height="{height}">{dots}</svg>'
            f'<div class="legend">{legend}</div><div id="map-tip" class="tip"></div>'
            f'<script type="application/json" id="map-thumbs">{data}</script><script>{MAP_SCRIPT}</script>')


def subheading(text: str) -> str:
    return f"<h3>{html.escape(text)}</h3>"


def image_strip(thumbs: list[str | None], captions: list[list[str]]) -> str:
    """Small thumbnails in a row (a cluster's members)."""
    figures = (_figure(thumb, [html.escape(line) for line in caption], "small") for thumb, caption in zip(thumbs, captions))
    return f'<div class="row">{"".join(figures)}</div>'


def write_page(path: str | Path, page: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
