"""HTML pieces of a page: headings, sentences, tables, cards and links, with every value
that comes from data or configuration HTML-escaped where it lands.

The executive page (:mod:`analysis.narrative`) and the analyst notebooks write with
these; the templates style them (``.kpis``, ``.number``, ``.bottom-line``).
"""

from __future__ import annotations

import html

import pandas as pd

from analysis.config import Config
from analysis.data import absent_input_sentence

__all__ = ["absent_note", "heading", "html_table", "kpi_cards", "link_list", "paragraph"]


def paragraph(template: str, /, **values: object) -> str:
    """An HTML paragraph with every value HTML-escaped.

    ``template`` is the project's own text with ``str.format`` fields; values (names of
    segments, categories, numbers) are formatted, then escaped.
    """
    safe = {}
    for key, value in values.items():
        safe[key] = _Escaped(value)
    return "<p>" + template.format(**safe) + "</p>"


def absent_note(name: str, config: Config) -> str:
    """The one plain paragraph that stands in for a section needing the optional input
    ``name`` when the data lacks it (:data:`analysis.data.OPTIONAL_INPUTS`)."""
    return paragraph("{sentence}", sentence=absent_input_sentence(
        name, margin_rate=config.strategy.margin_rate,
        retention_rate=config.strategy.retention_rate))


def html_table(frame, *, formats: dict[str, str] | None = None,
               labels: dict[str, str] | None = None, index: bool = False) -> str:
    """A frame as an HTML table with every cell and header escaped, numbers formatted.

    ``formats`` maps columns to format specs (``".1%"``, ``",.0f"``); ``labels`` renames
    columns for readers. Numeric columns (not booleans) get the class ``number``, which
    the executive template aligns right; text columns stay left-aligned. (pandas' own
    ``to_html(escape=True)`` leaves headers raw and cannot class a column's cells.)
    """
    formats = formats or {}
    shown = frame.reset_index() if index else frame

    def cell(value: object, spec: str | None) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return ""
        if spec:
            return html.escape(format(value, spec))
        if isinstance(value, float):
            return html.escape(f"{value:,.2f}")
        return html.escape(str(value))

    columns = [shown.iloc[:, i] for i in range(shown.shape[1])]
    classes = [' class="number"' if pd.api.types.is_numeric_dtype(col)
               and not pd.api.types.is_bool_dtype(col) else "" for col in columns]
    head = "".join(f"<th{k}>{html.escape(str((labels or {}).get(col.name, col.name)))}</th>"
                   for col, k in zip(columns, classes))
    cells = [[cell(v, formats.get(col.name)) for v in col.tolist()] for col in columns]
    rows = "".join("<tr>" + "".join(f"<td{k}>{v}</td>" for k, v in zip(classes, row))
                   + "</tr>\n" for row in zip(*cells))
    return (f'<table class="table">\n<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{rows}</tbody>\n</table>")


class _Escaped:
    """Formats a value as the wrapped value would, then HTML-escapes the text."""

    def __init__(self, value: object):
        self.value = value

    def __format__(self, spec: str) -> str:
        return html.escape(format(self.value, spec))


def kpi_cards(items: list[tuple[str, str]]) -> str:
    """Key numbers as HTML cards; ``items`` are (formatted value, label), both escaped."""
    cards = "".join(f'<div class="kpi"><div class="value">{html.escape(v)}</div>'
                    f'<div class="label">{html.escape(label)}</div></div>'
                    for v, label in items)
    return f'<div class="kpis">{cards}</div>'


def heading(text: str, level: int = 2) -> str:
    """An HTML heading with the text escaped."""
    return f"<h{level}>{html.escape(text)}</h{level}>"


def link_list(links: list[tuple[str, str]]) -> str:
    """An HTML list of (label, relative href) links, both escaped."""
    items = "".join(f'<li><a href="{html.escape(href, quote=True)}">{html.escape(label)}</a></li>'
                    for label, href in links)
    return f"<ul>{items}</ul>"
