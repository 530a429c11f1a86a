"""The one-page, self-contained `index.html`: tables and plots embedded, every text escaped.

The page answers first — which variant to pick at each n (sentences, then the pick table) — then
shows the plots, the per-variant headlines, the tables, and last how it was measured (machine,
command, method).

The page needs no server and no network: plots are PNG data URIs. A tiny inline script counts,
once the page has loaded, what rendered and writes it into the body (used by the test that renders
the page in a headless browser): `data-images-loaded` images that decoded (naturalWidth > 0),
`data-tables-rendered` tables laid out with a header and a row, `data-picks-rendered` pick tables
among them, `data-answers-rendered` answer sentences laid out — each as "rendered/total".
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from pathlib import Path

from attnbench.harness.report.tables import Table

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:right}td:first-child{white-space:nowrap}
.wide{overflow-x:auto}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
td.bad{color:#b00}td.noisy{color:#a60}td.contended{color:#c40;font-weight:600}
code,pre{background:#f6f6f6;padding:.1em .3em}
pre{padding:.6em;overflow-x:auto;white-space:pre-wrap}img{max-width:100%;height:auto}
.note{color:#555;font-size:.9em}.warn{background:#fff4e0;padding:.4em .6em}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}
ul.answer li{margin:.3em 0}
table.pick{font-size:.82em}table.pick td{text-align:left;vertical-align:top;white-space:normal;
min-width:9em}table.pick td:first-child{min-width:0;font-weight:600;text-align:right}
table.pick td b{font-size:1.1em}table.pick td.none{color:#888;font-style:italic}
table.pick .marked{color:#b45a00}table.pick th{text-align:left}
"""

SCRIPT = """
window.addEventListener('load', function () {
  function count(name, items, ok) {
    items = Array.prototype.slice.call(items);
    document.body.setAttribute(name, items.filter(ok).length + '/' + items.length);
  }
  function shown(e) { return e.offsetWidth > 0 && e.offsetHeight > 0; }
  function table(t) { return shown(t) && t.rows.length > 1 && t.rows[1].cells.length > 0; }
  count('data-images-loaded', document.images,
        function (i) { return i.complete && i.naturalWidth > 0; });
  count('data-tables-rendered', document.querySelectorAll('table'), table);
  count('data-picks-rendered', document.querySelectorAll('table.pick'), table);
  count('data-answers-rendered', document.querySelectorAll('ul.answer li'),
        function (li) { return shown(li) && li.textContent.length > 0; });
});
"""


def _cell(cell: str, kind: str) -> str:
    if kind == "pick":  # first line the winner, then its cost and notes
        if "\n" not in cell:
            return f'<td class="none">{escape(cell)}</td>' if cell else "<td></td>"
        first, *rest = cell.split("\n")
        lines = [f"<b>{escape(first)}</b>"] + [
            f'<span class="marked">{escape(x)}</span>'
            if x.startswith(("marked", "no clean", "failed its implementation check"))
            else escape(x) for x in rest]
        return f"<td>{'<br>'.join(lines)}</td>"
    cls = ""
    if cell.endswith("✗"):  # failed its implementation check
        cls = ' class="bad"'
    elif cell.endswith("!"):
        cls = ' class="contended"'
    elif cell.endswith("~"):
        cls = ' class="noisy"'
    elif cell in ("oom", "skipped", "error", "invalid", "unsupported"):
        cls = ' class="bad"'
    return f"<td{cls}>{escape(cell)}</td>"


def table_html(t: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in t.header)
    rows = ["<tr>" + "".join(_cell(c, t.kind) for c in row) + "</tr>" for row in t.rows]
    note = f'<p class="note">{escape(t.note)}</p>' if t.note else ""
    cls = f' class="{escape(t.kind)}"' if t.kind else ""
    return (f'<h3>{escape(t.title)}</h3>{note}<div class="wide"><table{cls}><thead><tr>{head}'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def image(name: str, paths: Sequence[Path]) -> str:
    """A plot as an embedded PNG (and where its SVG lies); "" when it has no PNG."""
    png = next((p for p in paths if p.suffix == ".png"), None)
    if png is None:
        return ""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    svg = next((p.name for p in paths if p.suffix == ".svg"), "")
    out = (f"<h3>{escape(name)}</h3><img alt=\"{escape(name)}\" "
           f'src="data:image/png;base64,{data}">')
    return out + (f'<p class="note">vector: plots/{escape(svg)}</p>' if svg else "")


def document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def page(title: str, intro: Sequence[str], machine: dict[str, str], command: str,
         sections: Sequence[tuple[str, Sequence[Table]]],
         plots: Sequence[tuple[str, Sequence[Path]]], headlines: Sequence[str] = (),
         answer: Sequence[str] = (), picks: Sequence[Table] = (), rules: str = "") -> str:
    """The whole page as one string; every argument is plain text and is escaped here.

    Order: title, warnings (intro paragraphs starting "Warning"), the answer (`answer`
    sentences, `picks` tables, `rules`), plots, headlines, `sections`, then the other intro
    paragraphs, the machine and the command."""
    warn = [p for p in intro if p.startswith("Warning")]
    rest = [p for p in intro if not p.startswith("Warning")]
    parts = [f"<h1>{escape(title)}</h1>"]
    parts += [f'<p class="warn">{escape(p)}</p>' for p in warn]
    if answer or picks:
        parts.append("<h2>Which attention to use</h2>")
        parts.append('<ul class="answer">' + "".join(f"<li>{escape(s)}</li>" for s in answer)
                     + "</ul>")
        parts += [table_html(t) for t in picks]
        if rules:
            parts.append(f'<p class="note">{escape(rules)}</p>')
    if plots:
        parts.append("<h2>Plots</h2>")
    parts += [image(name, paths) for name, paths in plots]
    if headlines:
        parts.append("<h2>Headlines, variant by variant</h2><ul>")
        parts += [f"<li>{escape(h)}</li>" for h in headlines]
        parts.append("</ul>")
    for heading, tables in sections:
        parts.append(f"<h2>{escape(heading)}</h2>")
        parts += [table_html(t) for t in tables]
    parts.append("<h2>How this was measured</h2>")
    parts += [f'<p class="note">{escape(p)}</p>' for p in rest]
    parts.append("<dl>")
    parts += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in machine.items()]
    parts.append(f"</dl><pre>{escape(command)}</pre>")
    return document(title, "\n".join(parts))
