"""report.md and report.html rendered from the same list of blocks (no markdown package needed)."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str          # may hold `code` spans


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Image:
    file: str          # relative to the report
    caption: str


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame   # display strings
    caption: str
    # The columns the page shows, when the page cannot hold them all (report.md shows every column).
    html_columns: tuple[str, ...] | None = None


Block = Heading | Text | Bullets | Image | Table


def to_markdown(blocks: list[Block]) -> str:
    return "\n\n".join(_markdown(b) for b in blocks) + "\n"


def _markdown(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"{'#' * level} {text}"
        case Text(text):
            return text
        case Bullets(items):
            return "\n".join(f"- {item}" for item in items)
        case Image(file, caption):
            return f"![{file}]({file})\n\n*{caption}*"
        case Table(frame, caption, _):
            def row(cells) -> str:
                return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
            lines = [row(frame.columns), row(["---"] * len(frame.columns)), *(row(r) for r in frame.itertuples(index=False))]
            return "\n".join(lines) + f"\n\n*{caption}*"
    raise TypeError(f"unknown report block {block!r}")


# Tables scroll inside themselves (display:block) so a wide one never widens the page past its 1,100 px.
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;display:block;max-width:100%;overflow-x:auto}th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption,.caption{font-style:italic;color:#555}
code{background:#f3f3f3;padding:0 .2em}"""


def to_html(blocks: list[Block], title: str) -> str:
    body = "\n".join(_html(b) for b in blocks)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{html.escape(title)}</title>\n"
            f"<style>\n{CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _inline(text: str) -> str:
    """Escaped text with `code` spans, the only inline markdown the report uses."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{_inline(text)}</h{level}>"
        case Text(text):
            return f"<p>{_inline(text)}</p>"
        case Bullets(items):
            return "<ul>\n" + "\n".join(f"<li>{_inline(i)}</li>" for i in items) + "\n</ul>"
        case Image(file, caption):
            return (f'<figure><img src="{html.escape(file)}" alt="{html.escape(file)}">'
                    f"<figcaption>{_inline(caption)}</figcaption></figure>")
        case Table(frame, caption, html_columns):
            if html_columns is not None:
                left_out = len(frame.columns) - len(html_columns)
                frame = frame[list(html_columns)]
                if left_out:
                    caption += f"; {left_out} more columns in report.md and the CSV"
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
            rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                             for r in frame.itertuples(index=False))
            return f'<table>\n<tr>{head}</tr>\n{rows}\n</table>\n<p class="caption">{_inline(caption)}</p>'
    raise TypeError(f"unknown report block {block!r}")
