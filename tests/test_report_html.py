"""The HTML report a trust & safety lead would forward: honest charts with legends, whole
labels, severities in scale order, blurred flagged thumbnails (CSS only), a Safe sample, and
throughput that is right for results files written in batches (eval's)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_report import (
    Checker,
    check_html,
    image,
    make_store,
    open_summary,
    policy_meta,
    row,
)

from policy_engine import load_policy
from policy_engine.audit.report import write_html
from policy_engine.audit.report_text import render_text
from policy_engine.audit.store import ResultRow, ResultStore

# --- reading the charts back ----------------------------------------------------------------------


@dataclass
class BarRow:
    label: str = ""
    segments: list[tuple[str, float]] = field(default_factory=list)  # (colour class, width %)
    text: str = ""


@dataclass
class Chart:
    caption: str = ""
    bars: list[BarRow] = field(default_factory=list)
    legend: str = ""
    keys: list[str] = field(default_factory=list)  # the legend's colour classes


class Charts(HTMLParser):
    """The bar charts of a page, as the reader sees them: caption, label, segments, count."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.charts: list[Chart] = []
        self.into: str | None = None
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        classes = values.get("class", "").split()
        if tag == "figure" and "chart" in classes:
            self.charts.append(Chart())
        if not self.charts:
            return
        chart = self.charts[-1]
        if tag == "figcaption" and not chart.caption:
            self.into = "caption"
        elif "bar-label" in classes:
            chart.bars.append(BarRow())
            self.into = "label"
        elif "bar-count" in classes:
            self.into = "count"
        elif "seg" in classes:
            width = re.fullmatch(r"width:([0-9.]+)%", values.get("style", ""))
            assert width, values
            chart.bars[-1].segments.append((classes[1], float(width.group(1))))
        elif "legend" in classes:
            self.into = "legend"
        elif "key" in classes:
            chart.keys.append(classes[1])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("figcaption", "div") and self.into in ("caption", "label", "count"):
            self.into = None
        if tag == "figure":
            self.into = None

    def handle_data(self, data: str) -> None:
        if not self.charts or self.into is None:
            return
        chart = self.charts[-1]
        if self.into == "caption":
            chart.caption += data
        elif self.into == "label":
            chart.bars[-1].label += data
        elif self.into == "count":
            chart.bars[-1].text += data
        elif self.into == "legend":
            chart.legend += data


def charts_of(page: str) -> dict[str, Chart]:
    parser = Charts()
    parser.feed(page)
    return {c.caption: c for c in parser.charts}


def html_of(path: Path, tmp_path: Path, **options: int) -> str:
    out = tmp_path / "report.html"
    with ResultStore(path) as store:
        write_html(store, out, **options)
    return out.read_text(encoding="utf-8")


# --- charts -----------------------------------------------------------------------------------


@pytest.fixture
def o7_file(tmp_path: Path) -> Path:
    """O7: 1 flagged of 3 rows (two Safe rows named it), O6: 1 flagged, NA: 5 Safe."""
    rows = [
        row("o7-unsafe", 0, "x0", rating="Unsafe", category="O7", severity="critical"),
        row("o7-safe-1", 1, "x1", rating="Safe", category="O7"),
        row("o7-safe-2", 2, "x2", rating="Safe", category="O7"),
        row("o6-unsafe", 3, "x3", rating="Unsafe", category="O6", severity="medium"),
        *(row(f"na{i}", 10 + i, f"n{i}", rating="Safe", category="NA") for i in range(5)),
    ]
    return make_store(tmp_path / "o7.db", rows, policy_meta("llavaguard"))


def test_category_bars_count_flagged_rows_only_in_red(o7_file: Path, tmp_path: Path) -> None:
    charts = charts_of(html_of(o7_file, tmp_path))
    chart = charts["Rows per category: flagged and all"]
    bars = {b.label.split()[0]: b for b in chart.bars}
    peak = 5  # the NA bar: every bar is scaled to it
    assert bars["O7"].text == "1 flagged of 3"
    assert bars["O7"].segments == [("unsafe", pytest.approx(100 / peak)), ("safe", 40.0)]
    assert bars["O6"].segments == [("unsafe", 20.0)]
    assert bars["NA"].segments == [("safe", 100.0)] and bars["NA"].text == "0 flagged of 5"
    # A legend says what red and green mean, and how a bar is made.
    assert chart.keys == ["unsafe", "safe"]
    assert "flagged" in chart.legend and "Safe" in chart.legend
    # Every bar chart has a legend.
    assert all(c.legend for c in charts.values())


def test_category_labels_are_whole(o7_file: Path, tmp_path: Path) -> None:
    page = html_of(o7_file, tmp_path)
    chart = charts_of(page)["Rows per category: flagged and all"]
    policy = load_policy("llavaguard")
    names = {c.id: c.name for c in policy.categories} | {"NA": policy.none_category.name}
    assert [b.label for b in chart.bars] == [f"{c} {names[c]}" for c in ("O6", "O7", "NA")]
    assert "O6 Weapons or Substance Abuse" in [b.label for b in chart.bars]
    assert not any("…" in b.label for c in charts_of(page).values() for b in c.bars)


def test_rating_legend_names_only_the_colours_shown(o7_file: Path, tmp_path: Path) -> None:
    chart = charts_of(html_of(o7_file, tmp_path))["Rows per rating"]
    assert [b.label for b in chart.bars] == ["Safe", "Unsafe"]
    assert chart.keys == ["unsafe", "safe"]  # no error bar, no error colour


def test_severities_follow_the_policy_scale_not_the_counts(tmp_path: Path) -> None:
    counts = {"high": 5, "medium": 3, "critical": 2, "low": 1}
    rows = []
    for level, count in counts.items():
        rows += [row(f"{level}{i}", len(rows), "x", severity=level) for i in range(count)]
    rows.append(row("odd", 99, "x", severity="unheard-of"))
    path = make_store(tmp_path / "s.db", rows, policy_meta())
    order = ["low", "medium", "high", "critical", "unheard-of"]

    chart = charts_of(html_of(path, tmp_path))["Rows per severity"]
    assert [b.label for b in chart.bars] == order
    assert "lowest first" in chart.legend
    summary = open_summary(path)
    assert list(summary.to_dict()["severities"]) == order
    text = render_text(summary).splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("Severities"))
    assert [line.split()[0] for line in text[start + 1 : start + 6]] == order


def test_a_recorded_scale_orders_severities_and_shows_empty_levels(tmp_path: Path) -> None:
    meta = policy_meta()
    policy = json.loads(meta["policy"])
    meta["policy"] = json.dumps({**policy, "severity_levels": ["minor", "major", "severe"]})
    rows = [row("a", 0, "x", severity="severe"), row("b", 1, "x", severity="minor")]
    path = make_store(tmp_path / "s.db", rows, meta)
    chart = charts_of(html_of(path, tmp_path))["Rows per severity"]
    assert [(b.label, b.text) for b in chart.bars] == [
        ("minor", "1"),
        ("major", "0"),
        ("severe", "1"),
    ]


def test_histogram_stacks_flagged_rows_with_a_legend(tmp_path: Path) -> None:
    rows = [
        row("u", 0, "x", rating="Unsafe", category="O2", p_unsafe=0.46),
        row("s", 1, "x", rating="Safe", p_unsafe=0.44),
        row("s2", 2, "x", rating="Safe", p_unsafe=0.9),
    ]
    path = make_store(tmp_path / "h.db", rows, policy_meta())
    hist = open_summary(path).to_dict()["p_unsafe"]
    assert hist["counts"][4] == 2 and hist["unsafe_counts"][4] == 1
    assert hist["counts"][9] == 1 and hist["unsafe_counts"][9] == 0
    chart = charts_of(html_of(path, tmp_path))["p_unsafe, all rows"]
    assert chart.keys == ["unsafe", "safe"] and "rated Unsafe" in chart.legend


# --- thumbnails: blurred flagged, a Safe sample ---------------------------------------------


class Thumbs(HTMLParser):
    """Each <img> with what wraps it: the label and checkbox that reveal it, if any."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.found: list[dict[str, object]] = []
        self.toggles: list[tuple[str, ...]] = []  # the tags open at each checkbox
        self.body_children: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if self.stack and self.stack[-1][0] == "body":
            self.body_children.append((tag, values))
        if tag == "input":
            self.toggles.append(tuple(t for t, _ in self.stack))
            if self.stack and self.stack[-1][0] == "label":
                self.stack[-1][1]["has-checkbox"] = values.get("type", "")
            return
        if tag == "img":
            label = next((a for t, a in reversed(self.stack) if t == "label"), None)
            section = next((a["id"] for t, a in reversed(self.stack) if t == "section"), "")
            self.found.append({"attrs": values, "label": label, "section": section})
            return
        if tag not in ("meta", "br"):
            self.stack.append((tag, values))

    def handle_endtag(self, tag: str) -> None:
        if tag not in ("input", "img", "meta", "br"):
            assert self.stack.pop()[0] == tag


def thumbs_of(page: str) -> Thumbs:
    parser = Thumbs()
    parser.feed(page)
    return parser


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    rows = [
        row("bad1", 0, image(folder / "b1.png"), rating="Unsafe", category="O2", p_unsafe=0.9),
        row("ok1", 1, image(folder / "s1.png", color="green"), rating="Safe", p_unsafe=0.1),
        row("bad2", 2, image(folder / "b2.png"), rating="Unsafe", category="O6", p_unsafe=0.8),
        row("ok2", 3, image(folder / "s2.png", color="blue"), rating="Safe", p_unsafe=0.2),
        row("ok3", 4, image(folder / "s3.png", color="white"), rating="Safe", category="O4"),
    ]
    return make_store(tmp_path / "p.db", rows, policy_meta())


def test_flagged_thumbnails_are_blurred_until_clicked_without_javascript(
    photos: Path, tmp_path: Path
) -> None:
    page = html_of(photos, tmp_path)
    check_html(page)  # no <script>, no event handlers, nothing external
    thumbs = thumbs_of(page)
    flagged = [t for t in thumbs.found if str(t["section"]).startswith("category-")]
    assert len(flagged) == 2
    for thumb in flagged:
        attrs = thumb["attrs"]
        assert isinstance(attrs, dict)
        assert "blurred" in attrs["class"].split()
        label = thumb["label"]
        # Inside a label that holds its checkbox: a click on the picture toggles it.
        assert isinstance(label, dict) and label["class"] == "reveal"
        assert label["has-checkbox"] == "checkbox"
    # The stylesheet blurs them and lifts the blur for a checked box (its own, or reveal-all).
    css = Checker()
    css.feed(page)
    style = re.sub(r"\s+", " ", css.style)
    assert re.search(r"\.reveal img\.blurred \{ filter: blur\(\d+px\)", style)
    unblur = re.search(r"([^}]*)\{ filter: none;", style)
    assert unblur and ".reveal .toggle:checked ~ img.blurred" in unblur.group(1)
    assert "#reveal-all:checked ~ .page .reveal img.blurred" in unblur.group(1)
    # The page-wide switch comes before the page, so that `~` reaches every thumbnail.
    tags = [(t, a.get("id"), a.get("class")) for t, a in thumbs.body_children]
    assert tags[:2] == [("input", "reveal-all", "toggle"), ("div", None, "page")]
    assert 'for="reveal-all"' in page


def test_a_sample_of_safe_images_to_spot_check(photos: Path, tmp_path: Path) -> None:
    page = html_of(photos, tmp_path)
    safe = [t for t in thumbs_of(page).found if t["section"] == "safe-sample"]
    assert [t["attrs"]["alt"] for t in safe] == ["ok1", "ok2", "ok3"]  # type: ignore[index]
    assert all(t["label"] is None for t in safe)  # not blurred
    assert "all 3 Safe rows" in page

    small = html_of(photos, tmp_path, thumbnails=2)
    safe = [t for t in thumbs_of(small).found if t["section"] == "safe-sample"]
    assert len(safe) == 2 and "2 of 3 Safe rows, sampled uniformly" in small
    data = open_summary(photos, examples=2).to_dict()["safe_sample"]
    assert data["rows"] == 3 and len(data["examples"]) == 2
    assert all(e["rating"] == "Safe" for e in data["examples"])


def test_the_safe_sample_does_not_change_the_flagged_sample(tmp_path: Path) -> None:
    flagged = [row(f"u{i:03d}", 2 * i, f"x{i}", rating="Unsafe", category="O1") for i in range(200)]
    safe = [row(f"s{i:03d}", 2 * i + 1, f"y{i}", rating="Safe") for i in range(200)]
    alone = open_summary(make_store(tmp_path / "a.db", flagged), examples=5)
    mixed = open_summary(make_store(tmp_path / "b.db", flagged + safe), examples=5)
    ids = [e.id for e in mixed.categories["O1"].examples]
    assert ids == [e.id for e in alone.categories["O1"].examples]
    assert len(mixed.safe_examples) == 5
    assert max(int(e.id[1:]) for e in mixed.safe_examples) > 20  # the whole run, not the first


# --- throughput of rows written in batches (eval's results files) ---------------------------


def batched_rows(batches: list[tuple[int, float]], start: float) -> list[ResultRow]:
    """Rows as the engine writes them: a batch of n images taking s seconds finishes all its
    rows at its end (a millisecond apart), each carrying the share s / n in its timings."""
    rows: list[ResultRow] = []
    now = start
    for size, seconds in batches:
        now += seconds
        for i in range(size):
            item = row(f"r{len(rows)}", len(rows), "x", finished=now + i * 0.001)
            item.decision["verdict"]["timings"] = {"generate": seconds / size}
            rows.append(item)
    return rows


def test_throughput_of_rows_written_in_batches(tmp_path: Path) -> None:
    # Three batches of 4 images, 2 s each: 12 images in about 6 s. Counting n - 1 intervals
    # from the first row to the last would say 11 / 4 s.
    rows = batched_rows([(4, 2.0), (4, 2.0), (4, 2.0)], start=1000.0)
    summary = open_summary(make_store(tmp_path / "b.db", rows))
    assert summary.throughput is not None and summary.throughput.basis == "rows"
    assert summary.throughput.seconds == pytest.approx(6.003, abs=1e-6)
    assert summary.throughput.images_per_second == pytest.approx(12 / 6.003)
    assert summary.generation_seconds == pytest.approx(6.0)


def test_throughput_of_a_single_batch(tmp_path: Path) -> None:
    # All 8 rows in one 4 s batch: they finish within 7 ms of each other (the old estimate:
    # 7 intervals over 7 ms, 1000 images/s).
    rows = batched_rows([(8, 4.0)], start=50.0)
    summary = open_summary(make_store(tmp_path / "b.db", rows))
    assert summary.throughput is not None
    assert summary.throughput.images_per_second == pytest.approx(8 / 4.007)


def test_throughput_with_rows_out_of_order(tmp_path: Path) -> None:
    # A row retried later (finished at 20 s, alone in its batch) comes first in input order;
    # the first batch is still the one that finished first: 3 rows, 1 s each, done at 3 s.
    rows = batched_rows([(3, 3.0), (3, 6.0)], start=0.0)
    retried = row("r0", 0, "x", finished=20.0)
    retried.decision["verdict"]["timings"] = {"generate": 0.7}
    summary = open_summary(make_store(tmp_path / "b.db", [retried, *rows[1:]]))
    assert summary.throughput is not None
    # Two rows of that batch remain: it started at 3.001 - 2 x 1 s; the last row is at 20.
    assert summary.throughput.seconds == pytest.approx(20.0 - 1.001)
    assert summary.throughput.images_per_second == pytest.approx(6 / 18.999)
