"""Render an audit report of real photographs in headless Chromium and check what a picture can.

    .venv/bin/pip install scikit-image          # the photographs (skimage.data, offline)
    apt-get install -y chromium                 # the browser
    .venv/bin/python scripts/report_screenshot.py /tmp/report-demo --png /tmp/report-screenshot.png

It writes scikit-image's sample photographs into DIR/photos, audits them as a user would
(`policy-engine audit` with the offline tiny-random model, sampling with a seed: random
weights, so the report must warn), writes `policy-engine report --html`, and screenshots the
page twice: as opened, and with every flagged thumbnail revealed (the page's own CSS switch,
checked). Then it checks that the page is not blank, that the random-weights banner is drawn
(its red border is on screen), and that the flagged thumbnails are blurred: where the two
renders differ (the pictures), the blurred one keeps little detail (mean edge strength under a
third of the revealed one's).
It prints one JSON line of what it measured and exits 1 if a check fails, 2 on a usage problem
(no scikit-image, no Chromium).

Use --backend/-o/--mode to audit with something else (any `policy-engine audit` options after
`--`); see docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "retina",
    "immunohistochemistry", "cat", "horse", "coins", "moon",
)  # fmt: skip
BANNER_RED = (198, 40, 40)  # --unsafe, the banner's border
CHROMIUM_FLAGS = (
    *("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
    "--hide-scrollbars",
)


def chromium_screenshot(browser: str, page: Path, png: Path, window: str) -> str:
    """Render the HTML file `page` with headless Chromium (a fresh profile) into `png`, at
    `window` ("WIDTH,HEIGHT"); returns what Chromium said on stderr. Also used by
    tests/test_report_browser.py."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                f"--window-size={window}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    return done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="working directory (created)")
    parser.add_argument("--png", type=Path, default=Path("/tmp/report-screenshot.png"))
    parser.add_argument("--window", default="1280,2000", help="WIDTH,HEIGHT of the page")
    parser.add_argument("--thumbnails", default="12")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    audit_options = argv[cut + 1 :]  # for policy-engine audit; default: the tiny-random model
    try:
        from PIL import Image, ImageChops, ImageFilter, ImageStat
        from skimage import data
    except ImportError as err:
        print(f"error: {err.name} is needed: .venv/bin/pip install scikit-image", file=sys.stderr)
        return 2
    browser = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )
    if browser is None:
        print("error: no Chromium on PATH: apt-get install -y chromium", file=sys.stderr)
        return 2
    cli = Path(sys.executable).with_name("policy-engine")

    photos = args.dir / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        try:
            picture = Image.fromarray(getattr(data, name)())
        except Exception as err:  # a sample that needs a download: skip it
            print(f"note: skipping {name} ({err})", file=sys.stderr)
            continue
        picture.convert("RGB").save(photos / f"{name}.jpg", quality=90)

    results = args.dir / "results.db"
    results.unlink(missing_ok=True)
    # Seeded sampling: greedy decoding of random weights can call every photo Safe, and then
    # the page has no flagged thumbnail whose blur could be checked.
    options = audit_options or [
        *("--backend", "transformers", "-m", "tiny-random"),
        *("-o", "greedy=false", "-o", "seed=0"),
    ]
    audit = [str(cli), "audit", str(photos), "--out", str(results), "--no-progress", *options]
    done = subprocess.run(audit, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):  # 1: some rows are errors, still a report
        print(done.stderr, file=sys.stderr)
        return 1
    page = args.dir / "report.html"
    report = [str(cli), "report", str(results), "--html", str(page)]
    subprocess.run([*report, "--thumbnails", args.thumbnails], check=True, capture_output=True)
    html = page.read_text(encoding="utf-8")
    # For the checks, two copies that differ only in the thumbnails: the hint over each
    # blurred picture and the switch's label are hidden; one copy has the switch checked.
    quiet = html.replace("</style>", ".reveal .hint, nav .button { visibility: hidden; }</style>")
    check_page, revealed_page = args.dir / "check.html", args.dir / "check-revealed.html"
    check_page.write_text(quiet, encoding="utf-8")
    revealed_page.write_text(
        quiet.replace('id="reveal-all" class="toggle"', 'id="reveal-all" class="toggle" checked'),
        encoding="utf-8",
    )

    def shoot(source: Path, target: Path, window: str) -> Image.Image:
        chromium_screenshot(browser, source, target, window)
        return Image.open(target).convert("RGB")

    saved = shoot(page, args.png, args.window)
    # The checks look at the whole page: tall enough for every thumbnail.
    shown = shoot(check_page, args.dir / "whole.png", "1280,8000")
    revealed = shoot(revealed_page, args.dir / "whole-revealed.png", "1280,8000")
    mask = ImageChops.difference(shown, revealed).convert("L").point(lambda v: 255 * (v > 24))
    changed = int(ImageStat.Stat(mask).sum[0]) // 255
    measured = {
        "screenshot": str(args.png),
        "report": str(page),
        "thumbnails": html.count('class="thumb"'),
        "flagged_thumbnails": html.count('class="blurred"'),
        "grey_stddev": round(ImageStat.Stat(saved.convert("L")).stddev[0], 1),
        "banner_on_screen": BANNER_RED
        in {c for _, c in saved.crop((0, 0, 1280, 200)).getcolors(1 << 16) or []},
        "changed_pixels": changed,
    }
    checks = {
        "not blank": measured["grey_stddev"] > 10,
        "banner drawn": measured["banner_on_screen"] or "RANDOM WEIGHTS" not in html,
    }
    if changed:
        # Detail (edge strength) where the pictures are: blurred ones keep little of it.
        sharp = ImageStat.Stat(revealed.convert("L").filter(ImageFilter.FIND_EDGES), mask).mean[0]
        soft = ImageStat.Stat(shown.convert("L").filter(ImageFilter.FIND_EDGES), mask).mean[0]
        measured |= {"edges_revealed": round(sharp, 2), "edges_blurred": round(soft, 2)}
        checks["flagged thumbnails blurred"] = soft < sharp / 3
    elif measured["flagged_thumbnails"]:
        checks["flagged thumbnails blurred"] = False  # revealing them changed nothing
    else:
        measured["note"] = "nothing was flagged: the blur was not checked"
    measured["checks"] = checks
    print(json.dumps(measured))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
