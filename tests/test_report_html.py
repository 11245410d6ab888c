"""Tests for simulations.audits.report_html: structure, self-containment, escaping, and a real browser."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pytest
from matplotlib.figure import Figure
from PIL import Image

from simulations.audits.report_html import (
    PNG_SIGNATURE,
    Banner,
    Plot,
    Section,
    Table,
    bar_chart,
    chromium_binary,
    dump_dom,
    format_cell,
    format_epsilon,
    line_chart,
    render_html,
    render_report,
)

AUDIT_IDS = ["ledger", "exposure", "membership-inference", "wire", "disparity"]
HOSTILE = '<script>alert("x")</script> & \'quoted\''


class ReportParser(HTMLParser):
    """Collects what the tests check: sections with their <h2>, images, and anything that loads."""

    def __init__(self):
        super().__init__()
        self.section_ids: list[str] = []
        self.section_headings: dict[str, str] = {}
        self.image_sources: list[str] = []
        self.tags: list[str] = []
        self.external_references: list[str] = []
        self.csp: str | None = None
        self.title = ""
        self._current_section: str | None = None
        self._in_h2 = self._in_title = False
        self._cells: list[str] = []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self._current_section = attributes["id"]
            self.section_ids.append(attributes["id"])
        elif tag == "h2" and self._current_section:
            self._in_h2 = True
            self.section_headings[self._current_section] = ""
        elif tag == "img":
            self.image_sources.append(attributes.get("src", ""))
        elif tag == "title":
            self._in_title = True
        elif tag in ("td", "th"):
            self._in_cell = True
            self._cells.append("")
        elif tag == "meta" and attributes.get("http-equiv") == "Content-Security-Policy":
            self.csp = attributes["content"]
        # Anything pointing outside the page (links inside it start with '#').
        for name in ("href", "src"):
            value = attributes.get(name)
            if value and not value.startswith(("#", "data:")):
                self.external_references.append(value)

    def handle_endtag(self, tag):
        if tag == "section":
            self._current_section = None
        elif tag == "h2":
            self._in_h2 = False
        elif tag == "title":
            self._in_title = False
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_h2 and self._current_section:
            self.section_headings[self._current_section] += data
        if self._in_title:
            self.title += data
        if self._in_cell:
            self._cells[-1] += data

    @property
    def cells(self) -> list[str]:
        return self._cells


def parse(page: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(page)
    parser.close()
    return parser


def matplotlib_figure() -> Figure:
    figure = Figure(figsize=(2, 1.5))
    figure.add_subplot().plot([0, 1, 2], [1, 0, 1])
    return figure


def audit_sections() -> list[Section]:
    return [
        Section(
            id="ledger",
            title="Epsilon ledger",
            method_note="Recomputed with dp-accounting.\n\nTolerance 5%.",
            tables=[("Per-user epsilon", ["user", "epsilon", "ok"], [["u0", 1.23456, True], ["u1", None, False]])],
        ),
        Section(id="exposure", title="Canary exposure", figures=[bar_chart(["c0", "c1"], [3.0, 1.5], title="bits")]),
        Section(
            id="membership-inference",
            title="Membership inference",
            figures=[Plot("privacy-utility", line_chart({"DP": ([8, 1, 4], [0.6, 0.4, 0.5])}, xlabel="epsilon"))],
        ),
        Section(id="wire", title="Wire audit", tables=[Table("Hits", ["encoding", "hits"], [["utf-8", 0]])]),
        Section(id="disparity", title="Disparity", figures=[matplotlib_figure()]),
    ]


# ---------------------------------------------------------------- structure


def test_every_section_has_its_id_and_h2(tmp_path):
    path = render_report(tmp_path / "report.html", title="Audit", sections=audit_sections())
    page = parse(path.read_text(encoding="utf-8"))
    assert page.section_ids == AUDIT_IDS
    assert page.section_headings == {
        "ledger": "Epsilon ledger",
        "exposure": "Canary exposure",
        "membership-inference": "Membership inference",
        "wire": "Wire audit",
        "disparity": "Disparity",
    }


def test_page_is_self_contained():
    page = parse(render_html(title="Audit", sections=audit_sections()))
    assert len(page.image_sources) == 3
    assert all(src.startswith("data:image/png;base64,") for src in page.image_sources)
    assert page.external_references == []
    assert "script" not in page.tags and "link" not in page.tags
    # The browser must refuse anything that is not inline.
    assert page.csp is not None and "default-src 'none'" in page.csp and "img-src data:" in page.csp


def test_embedded_images_decode_as_png():
    page = parse(render_html(title="Audit", sections=audit_sections()))
    for src in page.image_sources:
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # raises on a truncated or corrupt PNG
            assert image.width > 50 and image.height > 50


def test_table_cells_are_formatted():
    page = parse(render_html(title="Audit", sections=audit_sections()))
    assert page.cells[:6] == ["user", "epsilon", "ok", "u0", "1.235", "yes"]
    assert page.cells[6:9] == ["u1", "—", "no"]
    assert format_cell(float("nan")) == "NaN" and format_cell(12) == "12"


def test_method_note_blank_lines_become_paragraphs():
    page = render_html(title="Audit", sections=audit_sections()[:1])
    assert '<p class="method">Recomputed with dp-accounting.</p><p class="method">Tolerance 5%.</p>' in page


def test_meta_is_rendered():
    page = render_html(title="Audit", sections=[], meta={"run": "r-17", "delta": 1e-5})
    assert "<dt>run</dt><dd>r-17</dd>" in page and "<dt>delta</dt><dd>1e-05</dd>" in page


def test_banner_comes_first_and_says_pass_or_fail():
    passed = render_html(title="Audit", sections=audit_sections(), meta={"run": "r"}, banner=Banner("All passed", ok=True))
    assert '<h1>Audit</h1><p class="banner pass" role="status">All passed</p><dl class="meta">' in passed
    failed = render_html(title="Audit", sections=[], banner=Banner("AUDIT FAILED: ledger", ok=False))
    assert '<p class="banner fail" role="status">AUDIT FAILED: ledger</p>' in failed
    assert "banner" not in render_html(title="Audit", sections=[]).split("</style>")[1]


def test_a_section_note_precedes_its_method():
    page = render_html(title="t", sections=[Section(id="dp-impact", title="DP", method_note="How.", note="Skipped: no baseline.")])
    assert '<h2>DP</h2><p class="note">Skipped: no baseline.</p><p class="method">How.</p>' in page


def test_format_epsilon():
    assert format_epsilon(None) == "inf" and format_epsilon(float("inf")) == "inf"
    assert format_epsilon(1.23456) == "1.235" and format_epsilon(0.0) == "0.000"


# ---------------------------------------------------------------- escaping


def test_everything_user_supplied_is_escaped():
    section = Section(
        id="wire",
        title=HOSTILE,
        method_note=HOSTILE,
        note=HOSTILE,
        tables=[(HOSTILE, [HOSTILE], [[HOSTILE]])],
        figures=[Plot(HOSTILE, bar_chart(["a"], [1.0]))],
    )
    raw = render_html(title=HOSTILE, sections=[section], meta={HOSTILE: HOSTILE}, banner=Banner(HOSTILE, ok=False))
    page = parse(raw)
    assert "<script>" not in raw
    assert "script" not in page.tags
    # The text survives escaping unchanged for the reader.
    assert page.title == HOSTILE
    assert page.section_headings["wire"] == HOSTILE
    assert page.cells == [HOSTILE, HOSTILE]
    assert 'alt="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;quoted&#x27;"' in raw


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("bad_id", ["", "1st", "has space", 'x"onload="y', "a/b"])
def test_bad_section_ids_are_rejected(bad_id):
    with pytest.raises(ValueError):
        render_html(title="t", sections=[Section(id=bad_id, title="t")])


def test_duplicate_section_ids_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        render_html(title="t", sections=[Section(id="wire", title="a"), Section(id="wire", title="b")])


def test_ragged_table_and_non_png_bytes_are_rejected():
    with pytest.raises(ValueError, match="row 0"):
        render_html(title="t", sections=[Section(id="a", title="a", tables=[("c", ["x", "y"], [[1]])])])
    with pytest.raises(ValueError, match="PNG"):
        render_html(title="t", sections=[Section(id="a", title="a", figures=[b"GIF89a..."])])
    with pytest.raises(TypeError):
        render_html(title="t", sections=[Section(id="a", title="a", figures=["plot.png"])])


def test_chart_helpers_validate_and_are_deterministic():
    with pytest.raises(ValueError):
        bar_chart(["a", "b"], [1.0])
    with pytest.raises(ValueError):
        line_chart({"s": ([1, 2], [1.0])})
    with pytest.raises(ValueError):
        line_chart({})
    many_labels = [f"client-{i}" for i in range(12)]
    chart = bar_chart(many_labels, list(range(12)), errors=[0.5] * 12, reference_line=5, reference_label="global")
    assert chart.startswith(PNG_SIGNATURE)
    assert line_chart({"loss": ([1, 2, 3], [3.0, 2.0, 1.5])}, xlabel="round", integer_x=True).startswith(PNG_SIGNATURE)
    assert chart == bar_chart(many_labels, list(range(12)), errors=[0.5] * 12, reference_line=5, reference_label="global")


# ---------------------------------------------------------------- real browser


@pytest.mark.slow
@pytest.mark.skipif(
    chromium_binary() is None,
    reason="no chromium binary on PATH; install with: apt-get install -y --no-install-recommends chromium",
)
def test_report_loads_in_headless_chromium(tmp_path):
    path = render_report(tmp_path / "report.html", title="Audit", sections=audit_sections())
    dom = parse(dump_dom(path, tmp_path / "profile"))
    assert dom.section_ids == AUDIT_IDS
    assert len(dom.image_sources) == 3 and all(src.startswith("data:image/png") for src in dom.image_sources)
