"""The audit report: summary counts, text, JSON, the self-contained HTML file, the command."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import weakref
from collections import Counter
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from policy_engine import get_host, load_policy
from policy_engine.audit.report import report_command, write_html
from policy_engine.audit.report_text import render_text
from policy_engine.audit.store import ResultRow, ResultStore
from policy_engine.audit.summary import ERROR_EXAMPLES, Summary, summarize

SCRIPT = "<script>alert(1)</script>"
JPEG_PREFIX = "data:image/jpeg;base64,"


# --- building results files -----------------------------------------------------------------------


def policy_meta(name: str = "llavaguard") -> dict[str, str]:
    """The meta an audit writes for a policy (every key is optional for the report)."""
    policy = load_policy(name)
    compiled = get_host().compile(policy)
    described = {
        "id": policy.id,
        "version": policy.version,
        "hash": compiled.hash,
        "categories": [
            {"id": c.id, "name": c.name, "severity": c.severity} for c in policy.categories
        ],
        "none": {"id": policy.none_category.id, "name": policy.none_category.name},
    }
    return {
        "policy_id": policy.id,
        "policy_version": policy.version,
        "policy_hash": compiled.hash,
        "policy": json.dumps(described),
        "backend": "static",
        "mode": "verdict",
        "source": "/data/images",
        "shard": "2/4",
    }


def image(path: Path, size: tuple[int, int] = (64, 48), color: str = "red") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)


def row(
    item_id: str,
    seq: int,
    source: str,
    *,
    rating: str | None = "Safe",
    category: str | None = "NA",
    name: str | None = None,
    severity: str | None = None,
    p_unsafe: float | None = None,
    actions: tuple[str, ...] = (),
    rationale: str | None = "looks fine",
    error: tuple[str, str] | None = None,
    finished: float | None = None,
    seconds: float | None = None,
) -> ResultRow:
    verdict: dict[str, Any] = {
        "policy_id": "llavaguard",
        "policy_version": "1.2",
        "policy_hash": "sha256:x",
        "source": source,
        "timings": {},
    }
    if error is None:
        verdict.update(rating=rating, category_id=category, rationale=rationale)
        if name is not None:
            verdict["category_name"] = name
    else:
        verdict["error"] = {"kind": error[0], "message": error[1], "retryable": False}
        rating = category = severity = None
    extra: dict[str, Any] = {} if finished is None else {"finished": finished}
    return ResultRow(
        id=item_id,
        seq=seq,
        source=source,
        ok=error is None,
        rating=rating,
        category_id=category,
        severity=severity,
        p_unsafe=p_unsafe,
        actions=list(actions),
        error_kind=error[0] if error else None,
        error=error[1] if error else None,
        decision={
            "verdict": verdict,
            "actions": [{"name": a, "by": "test", "params": {}} for a in actions],
        },
        seconds=seconds,
        **extra,
    )


def make_store(path: Path, rows: list[ResultRow], meta: dict[str, str] | None = None) -> Path:
    store = ResultStore(path, create=True)
    if meta:
        store.set_meta(meta)
    if rows:
        store.write(rows)
    store.close()
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[ResultRow]]:
    """A results file with every kind of row: images present, moved, not files, errors."""
    imgs = tmp_path / "imgs"
    moved = image(imgs / "moved.png")
    rows = [
        row(
            "a",
            0,
            image(imgs / "a.png"),
            rating="Unsafe",
            category="O2",
            severity="high",
            p_unsafe=0.95,
            actions=("block",),
            rationale=SCRIPT,
        ),
        row(
            "b",
            1,
            image(imgs / "b.jpg"),
            rating="Unsafe",
            category="O2",
            severity="high",
            p_unsafe=0.71,
            actions=("block", "human_review"),
        ),
        row(
            "c<u>",
            2,
            image(imgs / "c.png"),
            rating="Unsafe",
            category="O2",
            severity="high",
            p_unsafe=0.55,
            actions=("block", "block"),
        ),
        row(
            "moved",
            3,
            moved,
            rating="Unsafe",
            category="O2",
            severity="high",
            p_unsafe=0.88,
            actions=("block",),
        ),
        row(
            "ds",
            4,
            "dataset/train/17",
            rating="Unsafe",
            category="O3",
            severity="high",
            p_unsafe=0.6,
            actions=("block",),
        ),
        row(
            "url",
            5,
            "<data URL image/png 98 bytes>",
            rating="Unsafe",
            category="O3",
            severity="high",
            p_unsafe=0.99,
            actions=("block",),
        ),
        row("safe1", 6, image(imgs / "s1.png"), p_unsafe=0.02, severity="low"),
        row("safe2", 7, image(imgs / "s2.png"), p_unsafe=0.1, severity="low"),
        row("o4safe", 8, image(imgs / "o4.png"), category="O4", p_unsafe=0.35, severity="low"),
        row(
            "err1",
            9,
            str(imgs / "gone.png"),
            error=("image", "cannot load image: file not found"),
            actions=("human_review",),
        ),
        row(
            "err2",
            10,
            str(imgs / "bad.png"),
            error=("image", "not a recognised image format"),
            actions=("human_review",),
        ),
        row("err3", 11, str(imgs / "x.png"), error=("backend", "connection refused")),
    ]
    path = make_store(tmp_path / "results.db", rows, policy_meta())
    Path(moved).rename(imgs / "elsewhere.png")
    return path, rows


def open_summary(path: Path, **options: Any) -> Summary:
    with ResultStore(path) as store:
        return summarize(store, **options)


# --- an HTML checker ------------------------------------------------------------------------------

VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}


class Checker(HTMLParser):
    """Walks a page: tags nest and close, references stay inside the file; collects what the
    tests look at (images and placeholders per section, category sections, text)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.problems: list[str] = []
        self.images: list[tuple[str, str, dict[str, str]]] = []  # (section id, src, attrs)
        self.placeholders: list[tuple[str, str]] = []  # (section id, text)
        self.category_sections: list[str] = []
        self.headings: dict[str, str] = {}
        self.text: list[str] = []
        self.style = ""
        self._placeholder: list[str] | None = None

    def section(self) -> str:
        return next((a.get("id", "") for t, a in reversed(self.stack) if t == "section"), "")

    def _check(self, tag: str, attrs: list[tuple[str, str | None]]) -> dict[str, str]:
        values = {k: v or "" for k, v in attrs}
        if tag in {"script", "link", "iframe", "object", "embed", "base"}:
            self.problems.append(f"<{tag}> in a self-contained report")
        for key in ("src", "href", "xlink:href", "action", "srcset"):
            if key in values and not values[key].startswith(("data:", "#")):
                self.problems.append(f"external reference {key}={values[key]!r}")
        if "url(" in values.get("style", ""):
            self.problems.append("url() in a style attribute")
        if any(k.startswith("on") for k in values):
            self.problems.append(f"event handler on <{tag}>")
        return values

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = self._check(tag, attrs)
        if tag == "img":
            self.images.append((self.section(), values.get("src", ""), values))
        if tag == "section" and "category" in values.get("class", "").split():
            self.category_sections.append(values.get("id", ""))
        if "placeholder" in values.get("class", "").split():
            self._placeholder = []
        if tag not in VOID:
            self.stack.append((tag, values))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check(tag, attrs)
        if tag == "img":
            self.images.append((self.section(), dict(attrs).get("src") or "", {}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            open_tags = [t for t, _ in self.stack]
            self.problems.append(f"</{tag}> closes nothing open (open: {open_tags})")
            return
        _, values = self.stack.pop()
        if "placeholder" in values.get("class", "").split() and self._placeholder is not None:
            self.placeholders.append((self.section(), " ".join(self._placeholder)))
            self._placeholder = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._placeholder is not None:
            self._placeholder.append(data)
        if self.stack and self.stack[-1][0] == "style":
            self.style += data
        if self.stack and self.stack[-1][0] == "h2":
            section = self.section()
            self.headings[section] = self.headings.get(section, "") + data


def check_html(page: str) -> Checker:
    assert page.startswith("<!DOCTYPE html>")
    checker = Checker()
    checker.feed(page)
    checker.close()
    assert checker.problems == []
    assert [t for t, _ in checker.stack] == [], "unclosed tags"
    assert "url(" not in checker.style and "@import" not in checker.style
    return checker


def jpeg(src: str) -> Image.Image:
    assert src.startswith(JPEG_PREFIX)
    picture = Image.open(io.BytesIO(base64.b64decode(src[len(JPEG_PREFIX) :])))
    assert picture.format == "JPEG"
    return picture


# --- summary --------------------------------------------------------------------------------------


def test_summary_counts_match_what_was_written(mixed: tuple[Path, list[ResultRow]]) -> None:
    path, rows = mixed
    summary = open_summary(path)

    assert summary.rows == len(rows)
    assert summary.ok == sum(r.ok for r in rows)
    assert summary.errors == sum(not r.ok for r in rows)
    assert summary.flagged == sum(r.rating == "Unsafe" for r in rows)
    assert dict(summary.ratings) == dict(Counter(r.rating for r in rows if r.rating))
    assert dict(summary.severities) == dict(Counter(r.severity for r in rows if r.severity))
    assert dict(summary.actions) == dict(Counter(a for r in rows for a in set(r.actions)))

    by_category = Counter(r.category_id for r in rows if r.category_id)
    flagged = Counter(r.category_id for r in rows if r.rating == "Unsafe")
    assert {c: s.rows for c, s in summary.categories.items()} == dict(by_category)
    assert {c: s.flagged for c, s in summary.categories.items()} == {
        c: flagged[c] for c in by_category
    }
    # Names and severities come from the policy in the meta; order is the policy's.
    policy = load_policy("llavaguard")
    names = {c.id: c.name for c in policy.categories}
    names[policy.none_category.id] = policy.none_category.name
    assert {c: s.name for c, s in summary.categories.items()} == {c: names[c] for c in by_category}
    assert summary.categories["O2"].policy_severity == policy.category("O2").severity
    order = [*(c.id for c in policy.categories), policy.none_category.id]
    assert list(summary.categories) == sorted(by_category, key=order.index)

    kinds = Counter(r.error_kind for r in rows if not r.ok)
    assert {k: g.count for k, g in summary.error_groups.items()} == dict(kinds)
    messages = {r.error for r in rows if r.error_kind == "image"}
    assert {e["message"] for e in summary.error_groups["image"].examples} == messages

    scores = [r.p_unsafe for r in rows if r.p_unsafe is not None]
    assert summary.p_unsafe.count == len(scores)
    assert summary.p_unsafe.mean == pytest.approx(sum(scores) / len(scores))
    assert summary.policy_id == "llavaguard"
    assert summary.expected is None  # no `total` in this meta


def test_p_unsafe_histogram_bins(tmp_path: Path) -> None:
    scores = [0.0, 0.05, 0.1, 0.1999, 0.5, 0.5, 0.73, 0.9, 0.95, 1.0, 1.0]
    rows = [row(f"r{i}", i, f"x{i}", p_unsafe=p) for i, p in enumerate(scores)]
    rows.append(row("none", 99, "y", p_unsafe=None))
    summary = open_summary(make_store(tmp_path / "r.db", rows))
    # An independent binning: bin k holds k/10 <= p < (k+1)/10, and 1.0 goes in the last.
    expected = [sum(1 for p in scores if k / 10 <= p < (k + 1) / 10) for k in range(10)]
    expected[9] += scores.count(1.0)
    assert summary.p_unsafe.counts == expected
    assert summary.p_unsafe.count == len(scores)
    hist = summary.to_dict()["p_unsafe"]
    assert hist["min"] == min(scores) and hist["max"] == max(scores)
    assert len(hist["edges"]) == 11 and hist["edges"][0] == 0.0 and hist["edges"][-1] == 1.0


def test_no_scores_no_histogram(tmp_path: Path) -> None:
    summary = open_summary(make_store(tmp_path / "r.db", [row("a", 0, "a")]))
    data = summary.to_dict()
    assert data["p_unsafe"] is None
    assert data["categories"]["NA"]["p_unsafe"] is None


def test_throughput_from_meta(tmp_path: Path) -> None:
    rows = [row(f"r{i}", i, "x", finished=5000.0 + i) for i in range(10)]
    meta = {"started": "1000", "finished": "1004"}
    summary = open_summary(make_store(tmp_path / "r.db", rows, meta))
    assert summary.throughput is not None
    assert summary.throughput.basis == "meta"
    assert summary.throughput.images_per_second == pytest.approx(10 / 4)


def test_throughput_from_rows_without_meta(tmp_path: Path) -> None:
    # Rows finished at 100, 102, ..., 118: 9 intervals over 18 s.
    rows = [row(f"r{i}", i, "x", finished=100.0 + 2 * i) for i in range(10)]
    meta = {"started": "not a time"}
    summary = open_summary(make_store(tmp_path / "r.db", rows, meta))
    assert summary.throughput is not None
    assert summary.throughput.basis == "rows"
    assert summary.throughput.images_per_second == pytest.approx(9 / 18)
    assert summary.to_dict()["throughput"]["basis"] == "rows"


def test_throughput_unknown_for_a_single_row(tmp_path: Path) -> None:
    summary = open_summary(make_store(tmp_path / "r.db", [row("a", 0, "a")]))
    assert summary.throughput is None
    assert not any(
        line.strip().startswith("throughput") for line in render_text(summary).splitlines()
    )


def test_error_examples_are_bounded_and_distinct(tmp_path: Path) -> None:
    messages = [f"failure {i % 7}" for i in range(20)]
    rows = [row(f"e{i}", i, "x", error=("output", m)) for i, m in enumerate(messages)]
    rows.append(row("anon", 50, "x", error=("output", "failure 0")))
    summary = open_summary(make_store(tmp_path / "r.db", rows))
    group = summary.error_groups["output"]
    assert group.count == len(rows)
    kept = [e["message"] for e in group.examples]
    assert len(kept) == ERROR_EXAMPLES
    assert len(set(kept)) == len(kept)
    assert kept == list(dict.fromkeys(messages))[:ERROR_EXAMPLES]


def test_text_keeps_data_on_one_line_without_control_characters(tmp_path: Path) -> None:
    rows = [row("evil\x1b[2J", 0, "x", error=("backend", "first line\nsecond\x1b[31m line"))]
    text = render_text(open_summary(make_store(tmp_path / "r.db", rows)))
    assert "\x1b" not in text
    line = next(line for line in text.splitlines() if "first line" in line)
    assert "second" in line and "evil" in line


def test_names_from_rows_when_the_meta_has_no_policy(tmp_path: Path) -> None:
    rows = [
        row("a", 0, "a", rating="Unsafe", category="X1", name="Custom thing"),
        row("b", 1, "b", rating="Unsafe", category="X2"),
    ]
    summary = open_summary(make_store(tmp_path / "r.db", rows))  # an old file: no meta at all
    assert summary.categories["X1"].name == "Custom thing"
    assert summary.categories["X2"].name is None
    assert summary.policy_id is None
    text = render_text(summary)
    assert "Custom thing" in text and "(unknown policy)" in text


def many_rows(count: int, categories: list[str]) -> Iterator[ResultRow]:
    for i in range(count):
        unsafe = i % 3 != 0
        yield row(
            f"img-{i:05d}",
            i,
            f"/nowhere/{i}.png",
            rating="Unsafe" if unsafe else "Safe",
            category=categories[i % len(categories)] if unsafe else "NA",
            p_unsafe=(i % 100) / 100,
            actions=("block",) if unsafe else (),
            rationale="r" * 50,
            error=("image", f"message {i}") if i % 97 == 0 else None,
        )


class TrackingStore(ResultStore):
    """Counts the rows alive while they are streamed: a proxy for flat memory."""

    alive = 0
    peak = 0

    def rows(self, *, errors_only: bool = False) -> Iterator[ResultRow]:
        def gone() -> None:
            TrackingStore.alive -= 1

        for item in super().rows(errors_only=errors_only):
            TrackingStore.alive += 1
            TrackingStore.peak = max(TrackingStore.peak, TrackingStore.alive)
            weakref.finalize(item, gone)
            yield item
            del item


def test_summary_streams_and_keeps_bounded_samples(tmp_path: Path) -> None:
    categories = ["O1", "O2", "O3", "O6", "O7"]
    rows = list(many_rows(5000, categories))
    path = make_store(tmp_path / "big.db", rows, policy_meta())
    flagged = Counter(r.category_id for r in rows if r.rating == "Unsafe")
    del rows

    TrackingStore.alive = TrackingStore.peak = 0
    with TrackingStore(path) as store:
        summary = summarize(store, examples=12)
    assert summary.rows == 5000
    # Only a couple of rows were ever alive at once: none is kept by the summary.
    assert TrackingStore.peak <= 3
    # Kept samples are bounded by the settings, not by the number of rows.
    assert summary.kept_examples == 12 * len(categories)
    assert all(len(s.examples) <= 12 for s in summary.categories.values())
    assert all(len(g.examples) <= ERROR_EXAMPLES for g in summary.error_groups.values())
    for cid, stats in summary.categories.items():
        assert stats.flagged == flagged[cid]
        ids = [e.id for e in stats.examples]
        assert ids == sorted(ids)  # shown in input order
        assert all(e.category_id == cid and e.rating == "Unsafe" for e in stats.examples)
    # Reservoir sampling over the whole run, not the first N; and the same every time.
    first = sorted(r.id for r in many_rows(5000, categories) if r.category_id == "O1")[:12]
    assert [e.id for e in summary.categories["O1"].examples] != first
    assert max(int(e.id[4:]) for e in summary.categories["O1"].examples) > 1000
    again = open_summary(path, examples=12)
    assert again.to_dict() == summary.to_dict()


def test_examples_zero_keeps_none(tmp_path: Path) -> None:
    path = make_store(tmp_path / "r.db", list(many_rows(60, ["O1"])))
    summary = open_summary(path, examples=0)
    assert summary.kept_examples == 0
    assert summary.categories["O1"].flagged == 40


# --- text and JSON --------------------------------------------------------------------------------


def test_text_summary_shows_the_counts(mixed: tuple[Path, list[ResultRow]]) -> None:
    path, rows = mixed
    text = render_text(open_summary(path))
    lines = text.splitlines()
    flagged = sum(r.rating == "Unsafe" for r in rows)
    assert any(line.split()[:2] == ["rows", str(len(rows))] for line in lines)
    assert any(line.split()[:2] == ["errors", "3"] for line in lines)
    assert any(line.split()[:2] == ["flagged", str(flagged)] for line in lines)
    assert "Violence, Harm, or Cruelty" in text
    assert "llavaguard v1.2" in text and "shard 2/4" in text
    assert "connection refused" in text
    o2 = next(line for line in lines if line.strip().startswith("O2 "))
    assert o2.split()[1:3] == ["4", "4"]


def test_json_shape(mixed: tuple[Path, list[ResultRow]]) -> None:
    path, rows = mixed
    result = CliRunner().invoke(report_command, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {
        "file",
        "policy",
        "totals",
        "ratings",
        "categories",
        "severities",
        "actions",
        "errors",
        "throughput",
        "p_unsafe",
        "sampling",
        "meta",
        "times",
        "generation_seconds",
    }
    assert data["totals"] == {
        "rows": len(rows),
        "ok": 9,
        "errors": 3,
        "flagged": 6,
        "expected": None,
    }
    assert data["policy"]["id"] == "llavaguard"
    o2 = data["categories"]["O2"]
    assert set(o2) == {
        "name",
        "policy_severity",
        "in_policy",
        "rows",
        "flagged",
        "ratings",
        "p_unsafe",
        "examples",
    }
    assert o2["ratings"] == {"Unsafe": 4}
    assert {e["id"] for e in o2["examples"]} == {"a", "b", "c<u>", "moved"}
    assert o2["examples"][0]["rationale"] == SCRIPT
    assert data["errors"]["backend"] == {
        "count": 1,
        "examples": [{"id": "err3", "message": "connection refused"}],
    }
    assert data["sampling"]["method"] == "reservoir"
    assert data["meta"]["shard"] == "2/4"
    json.dumps(data, allow_nan=False)


def test_to_dict_is_strict_json(tmp_path: Path) -> None:
    summary = open_summary(make_store(tmp_path / "r.db", []))
    text = json.dumps(summary.to_dict(), allow_nan=False)
    assert json.loads(text)["totals"]["rows"] == 0


# --- HTML -----------------------------------------------------------------------------------------


def test_html_is_self_contained_and_complete(
    mixed: tuple[Path, list[ResultRow]], tmp_path: Path
) -> None:
    path, rows = mixed
    out = tmp_path / "report.html"
    with ResultStore(path) as store:
        write_html(store, out)
    page = out.read_text(encoding="utf-8")
    checker = check_html(page)

    # One section per category present, in the policy's order, named.
    present = list(dict.fromkeys(r.category_id for r in rows if r.category_id))
    assert len(checker.category_sections) == len(present)
    headings = [checker.headings[s] for s in checker.category_sections]
    assert [h.split()[0] for h in headings] == ["O2", "O3", "O4", "NA"]
    assert "Violence, Harm, or Cruelty" in headings[0]

    # Thumbnails: the flagged rows whose source is a readable image file (a, b, c<u>), blurred
    # in their category's section; the Safe rows' (s1, s2, o4safe) in the Safe sample, not.
    assert all(src.startswith(JPEG_PREFIX) for _, src, _ in checker.images)
    flagged = [(s, a) for s, _, a in checker.images if s != "safe-sample"]
    readable = [r for r in rows if r.rating == "Unsafe" and Path(r.source).is_file()]
    assert len(flagged) == len(readable) == 3
    assert {s for s, _ in flagged} == {checker.category_sections[0]}
    assert all("blurred" in a.get("class", "").split() for _, a in flagged)
    safe = [a for s, _, a in checker.images if s == "safe-sample"]
    assert len(safe) == sum(r.rating == "Safe" for r in rows) == 3
    assert not any("blurred" in a.get("class", "") for a in safe)
    for _, src, _ in checker.images:
        assert max(jpeg(src).size) <= 160
    # Placeholders saying why: the moved file, a dataset row, an in-memory image.
    reasons = [text for _, text in checker.placeholders]
    assert len(reasons) == 3
    assert sum("file not found" in r for r in reasons) == 2
    assert sum("in-memory image or data URL" in r for r in reasons) == 1

    # Data is escaped everywhere: the rationale never becomes a script, ids never markup.
    assert SCRIPT not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<u>" not in page and "c&lt;u&gt;" in page
    assert SCRIPT in "".join(checker.text)  # and reads back as the original text
    assert any(attrs.get("title") == SCRIPT for _, _, attrs in checker.images)

    # Header and charts.
    text = " ".join(checker.text)
    for value in ("llavaguard", "1.2", policy_meta()["policy_hash"], "static", "2/4"):
        assert value in text
    # Overview: categories, ratings, severities, actions, p_unsafe; then one per category.
    assert page.count('<figure class="chart') == 5 + len(present)


def test_html_thumbnail_limit_and_orientation(tmp_path: Path) -> None:
    rows = []
    for i in range(7):
        picture = Image.new("RGB", (80, 40), "blue")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees when shown
        target = tmp_path / "imgs" / f"{i}.jpg"
        target.parent.mkdir(exist_ok=True)
        picture.save(target, exif=exif)
        rows.append(row(f"i{i}", i, str(target), rating="Unsafe", category="O7", p_unsafe=0.9))
    path = make_store(tmp_path / "r.db", rows, policy_meta())
    out = tmp_path / "r.html"
    with ResultStore(path) as store:
        write_html(store, out, thumbnails=3, thumb_size=32)
    checker = check_html(out.read_text(encoding="utf-8"))
    srcs = [src for _, src, _ in checker.images]
    assert len(srcs) == 3
    for src in srcs:
        width, height = jpeg(src).size
        assert height > width and max(width, height) <= 32  # upright, then shrunk
    assert "3 of 7 flagged" in " ".join(checker.text)

    with ResultStore(path) as store:
        write_html(store, out, thumbnails=0)
    checker = check_html(out.read_text(encoding="utf-8"))
    assert checker.images == [] and len(checker.category_sections) == 1


def test_html_corrupt_file_and_relative_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "audit"
    image(folder / "imgs" / "ok.png")
    (folder / "imgs" / "bad.jpg").write_text("not an image", encoding="utf-8")
    rows = [
        row("rel", 0, "imgs/ok.png", rating="Unsafe", category="O1"),
        row("bad", 1, str(folder / "imgs" / "bad.jpg"), rating="Unsafe", category="O1"),
    ]
    path = make_store(folder / "results.db", rows)
    monkeypatch.chdir(tmp_path)  # the relative source is found next to the results file
    out = tmp_path / "r.html"
    with ResultStore(path) as store:
        write_html(store, out)
    checker = check_html(out.read_text(encoding="utf-8"))
    assert len([s for _, s, _ in checker.images if s.startswith(JPEG_PREFIX)]) == 1
    assert len(checker.placeholders) == 1
    assert "not a recognised image format" in checker.placeholders[0][1]


def test_html_of_an_empty_results_file(tmp_path: Path) -> None:
    path = make_store(tmp_path / "empty.db", [], {"policy_id": "llavaguard"})
    out = tmp_path / "empty.html"
    with ResultStore(path) as store:
        write_html(store, out)
    checker = check_html(out.read_text(encoding="utf-8"))
    assert "no results yet" in " ".join(checker.text)
    assert checker.category_sections == [] and checker.images == []
    assert "no results yet" in render_text(open_summary(path))


def test_html_from_engine_decisions(tmp_path: Path) -> None:
    from policy_engine import Engine

    engine = Engine(
        "children-platform",
        "static",
        backend_options={
            "rating": "Unsafe",
            "category": "O7",
            "p_unsafe": 0.8,
            "rationale": SCRIPT,
        },
    )
    sources = [image(tmp_path / f"{i}.png", color="green") for i in range(3)]
    sources.append(str(tmp_path / "missing.png"))
    decisions = [engine.assess(s) for s in sources]
    rows = [ResultRow.from_decision(f"item{i}", i, d) for i, d in enumerate(decisions)]
    path = make_store(tmp_path / "r.db", rows, policy_meta("children-platform"))
    summary = open_summary(path)
    assert summary.flagged == 3 and summary.errors == 1
    assert dict(summary.actions) == dict(
        Counter(a.name for d in decisions for a in {a.name: a for a in d.actions}.values())
    )
    assert summary.error_groups["image"].count == 1
    assert summary.categories["O7"].examples[0].rationale == SCRIPT

    out = tmp_path / "r.html"
    result = CliRunner().invoke(report_command, [str(path), "--html", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stderr
    assert "flagged" in result.stdout
    checker = check_html(out.read_text(encoding="utf-8"))
    assert len(checker.images) == 3
    assert SCRIPT not in out.read_text(encoding="utf-8")


# --- the command's errors -------------------------------------------------------------------------


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(report_command, args)
    assert result.exit_code != 0
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert result.stdout == ""
    return lines[0]


def test_cli_missing_file(tmp_path: Path) -> None:
    line = one_line_error([str(tmp_path / "nope.db")])
    assert "nope.db" in line


def test_cli_not_a_results_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a database\n" * 20, encoding="utf-8")
    assert "not a results file" in one_line_error([str(text)])
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    assert "not a results file" in one_line_error([str(other)])
    assert "no such results file" in one_line_error([str(tmp_path)])


def test_cli_unwritable_html(mixed: tuple[Path, list[ResultRow]], tmp_path: Path) -> None:
    path, _ = mixed
    line = one_line_error([str(path), "--html", str(tmp_path / "no" / "such" / "dir.html")])
    assert "cannot write" in line


def test_cli_text_by_default(mixed: tuple[Path, list[ResultRow]]) -> None:
    path, rows = mixed
    result = CliRunner().invoke(report_command, [str(path)])
    assert result.exit_code == 0
    assert result.stderr == ""
    assert result.stdout.startswith("Audit report: ")
    assert f"rows       {len(rows)}" in result.stdout
