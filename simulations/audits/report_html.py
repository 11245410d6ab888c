"""A self-contained HTML page: the renderer behind ``report.html`` (issue #6).

``report.html`` must open from a USB stick or an e-mail attachment years later,
so it has no external resources at all: the CSS is inline, and every plot is a
PNG rendered with matplotlib's Agg backend and embedded as a base64 ``data:``
URI. A Content-Security-Policy meta tag makes the browser refuse anything else,
so the report cannot fetch a resource even if someone later adds a link by hand.
Every piece of text is HTML-escaped. Titles, cells and notes come from run data,
which includes user-controlled strings (persona names, PII placeholders).

Usage::

    render_report("runs/x/report.html", title="Audit of run x",
                  banner=Banner("All audits passed", ok=True), sections=[
        Section(id="ledger", title="Epsilon ledger", method_note="...",
                tables=[("Per-user epsilon", ["user", "epsilon"], rows)],
                figures=[bar_chart(users, epsilons, title="epsilon per user")]),
    ])
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import NamedTuple, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SECTION_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class Table(NamedTuple):
    """A table: ``caption``, column ``header`` and ``rows`` (a plain 3-tuple works too)."""

    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[object]]


class Plot(NamedTuple):
    """A figure with a caption. A bare Figure or PNG bytes is also accepted."""

    caption: str
    image: Figure | bytes


FigureLike = Union[Figure, bytes, Plot]


class Banner(NamedTuple):
    """A one-line verdict under the title, marked as passing (``ok``) or failing."""

    text: str
    ok: bool


@dataclass(frozen=True)
class Section:
    """One part of the page. ``id`` becomes the HTML id (letters, digits, ``-``, ``_``).

    ``note`` is a short statement shown first (e.g. why an audit was skipped);
    ``method_note`` says how the numbers were made.
    """

    id: str
    title: str
    method_note: str = ""
    tables: Sequence[Table | tuple] = field(default_factory=tuple)
    figures: Sequence[FigureLike] = field(default_factory=tuple)
    note: str = ""


# ---------------------------------------------------------------- plots


def figure_to_png(figure: Figure, dpi: int = 110) -> bytes:
    """Render a matplotlib Figure to PNG bytes with the Agg backend.

    An Agg canvas is attached explicitly so this works whatever backend
    pyplot was configured with, and without a display.
    ``Software`` metadata is dropped so identical plots give identical bytes.
    """
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def new_figure(width: float = 6.4, height: float = 3.6) -> Figure:
    # A bare Figure, not pyplot.figure(): pyplot keeps every figure alive in a
    # global registry until closed, which leaks memory in a long simulation.
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def bar_chart(
    labels: Sequence[object],
    values: Sequence[float],
    *,
    title: str = "",
    ylabel: str = "",
    errors: Sequence[float] | None = None,
    reference_line: float | None = None,
    reference_label: str = "",
) -> bytes:
    """A bar per label (e.g. a metric per client), as PNG bytes.

    ``errors`` draws error bars; ``reference_line`` a dashed horizontal line,
    e.g. the global model's value or chance (AUC 0.5).
    """
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels but {len(values)} values")
    figure = new_figure(width=max(4.0, min(12.0, 0.45 * len(labels) + 2)))
    axes = figure.add_subplot()
    positions = range(len(values))
    axes.bar(positions, values, yerr=errors, color="#4878a8", capsize=3 if errors is not None else 0)
    crowded = len(labels) > 8 or sum(len(str(label)) for label in labels) > 40  # slant long label rows so they do not overlap
    axes.set_xticks(
        list(positions), [str(label) for label in labels], rotation=45 if crowded else 0, ha="right" if crowded else "center"
    )
    if reference_line is not None:
        axes.axhline(reference_line, color="#c0392b", linestyle="--", linewidth=1, label=reference_label or None)
        if reference_label:
            axes.legend(frameon=False)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.spines[["top", "right"]].set_visible(False)
    return figure_to_png(figure)


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    integer_x: bool = False,
) -> bytes:
    """One line with markers per named (xs, ys) series, as PNG bytes.

    Meant for privacy-utility curves: x = epsilon, y = utility, one series per
    method. Points are sorted by x so that runs listed in any order draw a
    clean curve. ``integer_x`` puts ticks on whole numbers only (rounds).
    """
    if not series:
        raise ValueError("line_chart needs at least one series")
    figure = new_figure()
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
        points = sorted(zip(xs, ys))
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=str(name))
    if logx:
        axes.set_xscale("log")
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(frameon=False)
    axes.spines[["top", "right"]].set_visible(False)
    return figure_to_png(figure)


# ---------------------------------------------------------------- HTML

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222;
       max-width: 1000px; margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.2em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0 1em; color: #555; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; }
nav ol { columns: 2; }
section { border-top: 1px solid #ddd; margin-top: 2em; }
p.banner { font-weight: 600; padding: 0.6em 0.9em; border-radius: 4px; }
p.banner.pass { background: #e6f4ea; border-left: 4px solid #2e7d32; }
p.banner.fail { background: #fdecea; border-left: 4px solid #c0392b; }
p.note { font-style: italic; }
p.method { background: #f6f8fa; border-left: 3px solid #4878a8; padding: 0.5em 0.8em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #eef2f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 14px; }
"""

# The browser enforces this: no scripts, no fetches; images only from data: URIs.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def format_cell(value: object) -> str:
    """Display text for a table cell: 4 significant digits for floats, a dash for None."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return str(value)
    if isinstance(value, Real):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        return f"{number:.4g}"
    return str(value)


def format_epsilon(epsilon: float | None) -> str:
    """An epsilon for display: ``inf`` for None (no DP) or infinity, else three decimals."""
    if epsilon is None or (isinstance(epsilon, float) and math.isinf(epsilon)):
        return "inf"
    return f"{epsilon:.3f}"


def _is_numeric(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _render_cell(cell: object) -> str:
    css_class = ' class="num"' if _is_numeric(cell) else ""  # right-align numbers
    return f"<td{css_class}>{_escape(format_cell(cell))}</td>"


def _render_table(table: Table | tuple) -> str:
    caption, header, rows = table
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table {caption!r}: row {index} has {len(row)} cells, header has {len(header)}")
    head = "".join(f"<th>{_escape(name)}</th>" for name in header)
    body = "".join(
        "<tr>"
        + "".join(_render_cell(cell) for cell in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><caption>{_escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_bytes(image: Figure | bytes) -> bytes:
    if isinstance(image, Figure):
        return figure_to_png(image)
    if isinstance(image, (bytes, bytearray)):
        if not bytes(image).startswith(PNG_SIGNATURE):
            raise ValueError("figure bytes are not a PNG image")
        return bytes(image)
    raise TypeError(f"a figure must be a matplotlib Figure, PNG bytes or Plot, not {type(image).__name__}")


def _render_figure(item: FigureLike, alt: str) -> str:
    caption, image = (item.caption, item.image) if isinstance(item, Plot) else ("", item)
    data = base64.b64encode(_png_bytes(image)).decode("ascii")
    figcaption = f"<figcaption>{_escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_escape(caption or alt)}">{figcaption}</figure>'


def _render_method_note(note: str) -> str:
    # Blank lines separate paragraphs, so a note can be written as a docstring.
    paragraphs = [" ".join(part.split()) for part in re.split(r"\n\s*\n", note.strip()) if part.strip()]
    return "".join(f'<p class="method">{_escape(paragraph)}</p>' for paragraph in paragraphs)


def _render_section(section: Section) -> str:
    tables = "".join(_render_table(table) for table in section.tables)
    figures = "".join(
        _render_figure(item, alt=f"{section.title}, figure {number}") for number, item in enumerate(section.figures, 1)
    )
    note = f'<p class="note">{_escape(section.note)}</p>' if section.note else ""
    return (
        f'<section id="{_escape(section.id)}"><h2>{_escape(section.title)}</h2>'
        f"{note}{_render_method_note(section.method_note)}{tables}{figures}</section>"
    )


def _check_section_ids(sections: Sequence[Section]) -> None:
    seen: set[str] = set()
    for section in sections:
        if not _SECTION_ID.match(section.id):
            raise ValueError(f"section id {section.id!r} must be a letter followed by letters, digits, '-' or '_'")
        if section.id in seen:
            raise ValueError(f"duplicate section id {section.id!r}")
        seen.add(section.id)


def render_html(
    *, title: str, sections: Sequence[Section], meta: Mapping[str, object] | None = None, banner: Banner | None = None
) -> str:
    """The report as one HTML string (see :func:`render_report`)."""
    _check_section_ids(sections)
    banner_block = ""
    if banner is not None:
        verdict = "pass" if banner.ok else "fail"
        banner_block = f'<p class="banner {verdict}" role="status">{_escape(banner.text)}</p>'
    meta_block = ""
    if meta:
        items = "".join(f"<dt>{_escape(key)}</dt><dd>{_escape(format_cell(value))}</dd>" for key, value in meta.items())
        meta_block = f'<dl class="meta">{items}</dl>'
    contents = "".join(f'<li><a href="#{_escape(s.id)}">{_escape(s.title)}</a></li>' for s in sections)
    body = "".join(_render_section(section) for section in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_escape(title)}</h1>{banner_block}{meta_block}"
        f'<nav><h2>Contents</h2><ol>{contents}</ol></nav>{body}</body></html>\n'
    )


def render_report(
    path: str | Path,
    *,
    title: str,
    sections: Sequence[Section],
    meta: Mapping[str, object] | None = None,
    banner: Banner | None = None,
) -> Path:
    """Write a self-contained ``report.html`` to ``path`` and return the path.

    ``banner`` is a verdict line right under the title; ``meta`` is shown below
    it as key/value pairs, e.g. run id and configuration. Nothing
    time-dependent is added, so the same inputs give the same file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title=title, sections=sections, meta=meta, banner=banner), encoding="utf-8")
    return path


# ---------------------------------------------------------------- headless check

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> str | None:
    """A headless-capable Chromium on PATH (Debian's ``chromium`` first), or None."""
    import shutil

    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def dump_dom(path: str | Path, profile_dir: str | Path) -> str:
    """Load a page in headless Chromium and return the DOM it built (checks the page really renders).

    ``--no-sandbox`` is needed when running as root (containers, CI); the
    throwaway ``profile_dir`` keeps a real browser profile untouched.
    """
    import subprocess

    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH; install with: apt-get install -y --no-install-recommends chromium")
    result = subprocess.run(
        [binary, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile_dir}", "--dump-dom", Path(path).resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout
