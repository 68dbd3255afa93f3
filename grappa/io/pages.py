"""Self-contained HTML pages: ``grappa search --html`` (each query beside its neighbours) and evaluate's
``report.html`` (the tables and plots). Pictures inline (nothing fetched, no files beside the page),
every string from the data escaped. In retrieval people judge results by looking at them."""
from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from grappa.io.artifacts import atomic_path
from grappa.io.sources import ImageDecodeError, decode_image
from grappa.io.storage import StorageError, read_bytes

THUMB = 160  # the longest side of a thumbnail, in pixels; the aspect ratio is kept

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
"""


def thumbnail(uri: str, min_side: int, max_pixels: int, max_bytes: int) -> str | None:
    """A data: URI of the image at ``uri`` shrunk to THUMB pixels, or None when it cannot be read."""
    try:
        image = decode_image(read_bytes(uri, max_bytes), min_side, max_pixels)
    except (OSError, StorageError, ImageDecodeError):
        return None
    image.thumbnail((THUMB, THUMB))
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


def run_report(title: str, subtitle: str, results_md: str, figures: list[tuple[str, Path]]) -> str:
    """evaluate's page: the results tables of both folds and the routing, then each figure inline."""
    body = [f"<section>{markdown_html(results_md)}</section>"]
    body += [f'<section><h2>{html.escape(caption)}</h2><img class="figure" src="{png_inline(path)}" alt=""></section>'
             for caption, path in figures if Path(path).is_file()]
    return html_page(title, subtitle, "".join(body))


def search_page(title: str, subtitle: str, queries: list[dict], results: list[list[dict]]) -> str:
    """The page of ``grappa search --html``: per query (``uri``, ``thumb``) a row of its neighbours
    (``rank``, ``score``, ``image_id``, ``uri``, ``domain``, ``label``, ``thumb``)."""
    esc = html.escape
    sections = []
    for query, hits in zip(queries, results):
        figures = [_figure(query["thumb"], ["<b>query</b>", esc(Path(query["uri"]).name)], "query")]
        for hit in hits:
            where = " / ".join(esc(str(hit[key])) for key in ("domain", "label") if hit.get(key))
            figures.append(_figure(hit["thumb"], [
                f'<span class="score">#{hit["rank"]} · {hit["score"]:.3f}</span>',
                esc(hit["image_id"]), f'<span class="muted">{where}</span>' if where else ""]))
        sections.append(f'<section><h2>{esc(query["uri"])}</h2><div class="row">{"".join(figures)}</div></section>')
    return html_page(title, subtitle, "".join(sections))


def write_page(path: str | Path, page: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
