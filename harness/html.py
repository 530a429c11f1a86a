"""The one-page, self-contained `index.html`: tables and plots embedded, every text escaped.

The page needs no server and no network: plots are PNG data URIs. A tiny inline script counts the
images that decoded and writes the count into `<body data-images-loaded=...>` (used by the test
that renders the page in a headless browser).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from harness.tables import Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
td.bad{color:#b00}td.noisy{color:#a60}td.contended{color:#c40;font-weight:600}
code,pre{background:#f6f6f6;padding:.1em .3em}
pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}img{max-width:100%;height:auto}
.note{color:#555;font-size:.9em}.warn{background:#fff4e0;padding:.4em .6em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


def table_html(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    rows = []
    for row in t.rows:
        cells = []
        for cell in row:
            cls = ""
            if cell.endswith("!"):
                cls = ' class="contended"'
            elif cell.endswith("~"):
                cls = ' class="noisy"'
            elif cell in ("oom", "skipped", "error", "invalid", "unsupported"):
                cls = ' class="bad"'
            cells.append(f"<td{cls}>{escape(cell)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{escape(t.note)}</p>' if t.note else ""
    return (f"<h3>{escape(t.title)}</h3>{note}<table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def page(title: str, intro: Sequence[str], machine: dict[str, str], command: str,
         sections: Sequence[tuple[str, Sequence[Table]]],
         plots: Sequence[tuple[str, Sequence[Path]]], headlines: Sequence[str] = ()) -> str:
    """The whole page as one string; every argument is plain text and is escaped here."""
    parts = [f"<h1>{escape(title)}</h1>"]
    parts += [f'<p class="{"warn" if p.startswith("Warning") else "note"}">{escape(p)}</p>'
              for p in intro]
    parts.append("<h2>Machine and command</h2><dl>")
    parts += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in machine.items()]
    parts.append(f"</dl><pre>{escape(command)}</pre>")
    if headlines:
        parts.append("<h2>Headlines</h2><ul>")
        parts += [f"<li>{escape(h)}</li>" for h in headlines]
        parts.append("</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
    for name, paths in plots:
        png = next((p for p in paths if p.suffix == ".png"), None)
        if png is None:
            continue
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        svg = next((p.name for p in paths if p.suffix == ".svg"), "")
        parts.append(f"<h3>{escape(name)}</h3><img alt=\"{escape(name)}\" "
                     f'src="data:image/png;base64,{data}">')
        if svg:
            parts.append(f'<p class="note">vector: plots/{escape(svg)}</p>')
    for heading, tables in sections:
        parts.append(f"<h2>{escape(heading)}</h2>")
        parts += [table_html(t) for t in tables]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")
