"""Table and image helpers shared by the report's sections: one formatting rule for Markdown and HTML."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec`` (``"{:.2f}"``); a missing value is a dash, an unformattable one its text.

    >>> fmt(1234.5, "{:,.0f}"), fmt(None, "{:.2f}"), fmt("x", "{:.2f}")
    ('1,234', '–', 'x')
    """
    if value is None or value == "":
        return "–"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]
) -> tuple[list[str], list[list[str]]]:
    """(headers, body) of the ``(key, header, format)`` columns some row has a value for."""
    present = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    return [h for _, h, _ in present], [[fmt(r.get(k), f) for k, _, f in present] for r in rows]


def md_table(headers: list[str], body: list[list[str]]) -> str:
    """A Markdown pipe table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(out)


def html_table(headers: list[str], body: list[list[str]], highlight: int | None = None, bold_last: bool = False) -> str:
    """An HTML table, row ``highlight`` marked (the recommendation), the last row bold for totals."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    lines = []
    for i, row in enumerate(body):
        cls = ' class="rec"' if i == highlight else ' class="total"' if bold_last and i == len(body) - 1 else ""
        lines.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def html_img(name: str, png: bytes, alt: str) -> str:
    """An ``<img>`` with the PNG embedded as a data: URI, so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="{html.escape(name)}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
