"""The HTML building blocks of the report: escaping, numbers, tables, embedded figures, the style sheet.

Every string from a run (class names, paths, settings) goes through ``escape``; numbers through ``number``.
No scripts and no external resources: a report is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 background:#f6f7f9;color:#1d232b;line-height:1.45}
main{max-width:1150px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.7em;margin:0 0 4px}
h2{font-size:1.3em;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #d7dce3}
.sub{color:#5b6573;margin:0 0 18px}
nav{margin:10px 0 6px;font-size:.92em} nav a{margin-right:12px;color:#2458a6;text-decoration:none}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:6px 0 12px}
th,td{border:1px solid #d7dce3;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{font-weight:600;white-space:nowrap;color:#36404c}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0 12px}
.card{background:#fff;border:1px solid #d7dce3;border-radius:8px;padding:10px 16px;min-width:130px}
.card .v{font-size:1.45em;font-weight:650}
.card .k{font-size:.8em;color:#5b6573;text-transform:uppercase;letter-spacing:.03em}
img.fig{max-width:100%;height:auto;background:#fff;border:1px solid #d7dce3;border-radius:6px;display:block;
 margin:8px 0}
.na{color:#8a6d3b;background:#fcf8e3;border:1px solid #f0e1a8;padding:8px 12px;border-radius:6px;display:inline-block}
.note{color:#5b6573;font-size:.88em}
.scroll{overflow-x:auto;max-width:100%}
table.cm td,table.cm th{padding:2px 5px;font-size:.8em;text-align:right}
table.cm td.diag{font-weight:700;outline:1px solid #2458a6}
tr.low td{background:#fdecea}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
"""


def escape(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return escape(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return escape(value)
    if math.isnan(f):
        return "\u2014"
    if f.is_integer() and abs(f) >= 1000:
        return f"{int(f):,}"
    return f"{f:.{digits}f}" if abs(f) >= 10 ** -digits or f == 0 else f"{f:.2e}"


def card(name: str, value: Any) -> str:
    """One headline figure, as a card."""
    return f'<div class="card"><div class="k">{escape(name)}</div><div class="v">{number(value)}</div></div>'


def not_available(what: str = "Not available") -> str:
    return f'<p class="na">{escape(what)}</p>'


def png_img(path: Path, alt: str) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img class="fig" alt="{escape(alt)}" src="data:image/png;base64,{b64}">'


def kv_table(mapping: dict) -> str:
    rows = []
    for key, value in mapping.items():
        if isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, ensure_ascii=False, default=str)
            if len(text) > 400:
                text = text[:399] + "\u2026"
            cell = f"<code>{escape(text)}</code>"
        elif isinstance(value, float):
            cell = escape(repr(value))
        else:
            cell = escape(value)
        rows.append(f"<tr><td>{escape(key)}</td><td>{cell}</td></tr>")
    return '<table class="kv">' + "".join(rows) + "</table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def document(*, title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: ``title`` as heading, ``subtitle`` (HTML) under it, a link to each (anchor, title, HTML)
    section, then the sections."""
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t, _ in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><main>"
        f"<h1>{escape(title)}</h1><p class=\"sub\">{subtitle}</p><nav>{nav}</nav>"
        + "".join(section(a, t, body) for a, t, body in sections)
        + "</main></body></html>\n"
    )
