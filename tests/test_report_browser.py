"""The HTML report in a real browser: headless Chromium renders it to PNG, and the pixels show
that the page renders, that flagged thumbnails are blurred, that the page-wide switch and a
thumbnail's own checkbox lift the blur (CSS only), and that Safe thumbnails stay sharp.

Skipped, saying why, when no Chromium is installed (`apt-get install -y chromium`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat
from test_report import make_store, policy_meta, row

from policy_engine.audit.report import write_html

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from report_screenshot import chromium_screenshot

from policy_engine.audit.store import ResultStore

BROWSER = next(
    (
        found
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (found := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="no Chromium on PATH (apt-get install -y chromium) to render with"
)

YELLOW, BLUE = (255, 255, 0), (0, 0, 255)  # the flagged pictures' squares
MAGENTA, CYAN = (255, 0, 255), (0, 255, 255)  # the Safe pictures' squares
CHECKBOX = '<input type="checkbox" class="toggle">'


def checkerboard(path: Path, one: tuple[int, int, int], two: tuple[int, int, int]) -> str:
    """A 160x120 picture of 8-pixel squares: sharp, so any blur shows in its pixels."""
    picture = Image.new("RGB", (160, 120), one)
    for y in range(0, 120, 8):
        for x in range(0, 160, 8):
            if (x // 8 + y // 8) % 2:
                picture.paste(two, (x, y, x + 8, y + 8))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return str(path)


def screenshot(page: str, folder: Path, name: str) -> Image.Image:
    html_file = folder / f"{name}.html"
    html_file.write_text(page, encoding="utf-8")
    png = folder / f"{name}.png"
    assert BROWSER is not None
    said = chromium_screenshot(BROWSER, html_file, png, "1280,3000")
    assert png.is_file(), f"Chromium wrote no screenshot:\n{said[-2000:]}"
    return Image.open(png).convert("RGB")


def count(picture: Image.Image, colour: tuple[int, int, int], tolerance: int = 50) -> int:
    """Pixels within `tolerance` of `colour` on every channel."""
    bands = picture.split()
    masks = [
        band.point(lambda v, c=c: 255 if abs(v - c) <= tolerance else 0)
        for band, c in zip(bands, colour, strict=True)
    ]
    both = Image.composite(masks[0], Image.new("L", picture.size, 0), masks[1])
    every = Image.composite(both, Image.new("L", picture.size, 0), masks[2])
    return int(ImageStat.Stat(every).sum[0]) // 255


def changed(a: Image.Image, b: Image.Image) -> Image.Image:
    """A mask of the pixels that differ between two renders of the page."""
    mask = ImageChops.difference(a, b).convert("L").point(lambda v: 255 if v > 24 else 0)
    assert mask.getbbox() is not None, "the two renders are identical"
    return mask


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("browser")
    imgs = folder / "imgs"
    rows = [
        row(
            "flagged-1",
            0,
            checkerboard(imgs / "f1.png", YELLOW, BLUE),
            rating="Unsafe",
            category="O2",
            p_unsafe=0.9,
            actions=("block",),
            rationale="a test pattern standing in for a violent picture",
        ),
        row(
            "flagged-2",
            1,
            checkerboard(imgs / "f2.png", YELLOW, BLUE),
            rating="Unsafe",
            category="O6",
            p_unsafe=0.8,
            actions=("blur",),
        ),
        row("safe-1", 2, checkerboard(imgs / "s1.png", MAGENTA, CYAN), p_unsafe=0.1),
        row("safe-2", 3, checkerboard(imgs / "s2.png", MAGENTA, CYAN), p_unsafe=0.2),
    ]
    path = make_store(folder / "results.db", rows, policy_meta())
    out = folder / "report.html"
    with ResultStore(path) as store:
        write_html(store, out, thumbnails=4)
    return out.read_text(encoding="utf-8"), folder


def test_the_page_renders_with_flagged_thumbnails_blurred(report: tuple[str, Path]) -> None:
    page, folder = report
    shown = screenshot(page, folder, "as-opened")
    # Not blank: text, charts and pictures give many colours.
    assert len(shown.getcolors(maxcolors=1 << 20) or []) > 200
    assert ImageStat.Stat(shown.convert("L")).stddev[0] > 10
    # The Safe sample is sharp: its magenta squares are there, two pictures' worth.
    assert count(shown, MAGENTA) > 2 * 0.3 * 160 * 120 / 2
    # The flagged ones are blurred: almost none of their pure yellow squares survive.
    blurred_yellow = count(shown, YELLOW)

    revealed = screenshot(
        page.replace('id="reveal-all" class="toggle"', 'id="reveal-all" class="toggle" checked'),
        folder,
        "reveal-all",
    )
    revealed_yellow = count(revealed, YELLOW)
    assert revealed_yellow > 2 * 0.3 * 160 * 120 / 2  # both pictures, sharp
    assert blurred_yellow < revealed_yellow / 20

    # Where the renders differ is where the flagged pictures are: far smoother when blurred.
    mask = changed(shown, revealed)
    sharp = ImageStat.Stat(revealed.convert("L"), mask).stddev[0]
    soft = ImageStat.Stat(shown.convert("L"), mask).stddev[0]
    assert soft < sharp / 2, (soft, sharp)


def test_a_thumbnails_own_checkbox_reveals_only_it(report: tuple[str, Path]) -> None:
    page, folder = report
    assert page.count(CHECKBOX) == 2  # one per flagged thumbnail
    one = screenshot(
        page.replace(CHECKBOX, CHECKBOX.replace(">", " checked>"), 1), folder, "one-revealed"
    )
    everything = screenshot(
        page.replace('id="reveal-all" class="toggle"', 'id="reveal-all" class="toggle" checked'),
        folder,
        "all-revealed",
    )
    yellow_one, yellow_all = count(one, YELLOW), count(everything, YELLOW)
    assert yellow_all * 0.35 < yellow_one < yellow_all * 0.65  # one picture of two
