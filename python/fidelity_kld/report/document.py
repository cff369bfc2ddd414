"""A cohort report as a list of blocks (headings, paragraphs, tables, images), rendered to
plain text, Markdown or HTML by the same code, so the three never disagree."""

from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    # per column: "l" or "r"
    align: str = ""


@dataclass(frozen=True)
class Image:
    path: str
    caption: str


def to_text(blocks) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            if b.level == 1:
                out += [b.text, "=" * len(b.text)]
            else:
                out += ["", b.text, "-" * len(b.text)]
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out += [f"  - {item}" for item in b.items]
        elif isinstance(b, Table):
            out += _text_table(b)
        elif isinstance(b, Image):
            out.append(f"[figure: {b.path}]")
    return "\n".join(out) + "\n"


def _text_table(t: Table) -> list[str]:
    cols = list(zip(t.header, *t.rows))
    widths = [max(len(c) for c in col) for col in cols]
    align = t.align or "l" + "r" * (len(t.header) - 1)

    def line(cells):
        return "  " + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                for c, w, a in zip(cells, widths, align)).rstrip()
    return [line(t.header), *(line(r) for r in t.rows)]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(blocks) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            t_align = b.align or "l" + "r" * (len(b.header) - 1)
            out.append("| " + " | ".join(_md_escape(h) for h in b.header) + " |")
            out.append("|" + "|".join(":---" if a == "l" else "---:" for a in t_align) + "|")
            out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{b.caption}]({b.path})", "", f"*{b.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def to_html(blocks, title: str) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            align = b.align or "l" + "r" * (len(b.header) - 1)
            style = ['' if a == "l" else ' class="r"' for a in align]
            head = "".join(f"<th{s}>{e(h)}</th>" for h, s in zip(b.header, style))
            rows = "".join("<tr>" + "".join(f"<td{s}>{e(c)}</td>" for c, s in zip(r, style)) + "</tr>"
                           for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            body.append(f'<figure><img src="{e(b.path)}" alt="{e(b.caption)}">'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
    css = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;"
           "color:#222}table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}"
           "th,td{border:1px solid #ccc;padding:.25rem .5rem}th{background:#f3f3f3}"
           ".r{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}"
           "figcaption{font-size:.85rem;color:#555}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
