"""The `policy-engine report` command, and `write_html`: the report of a results file (an
audit's, or the one `policy-engine eval --out` writes).

The summary itself is made by `summary.summarize` and rendered by `report_text.render_text`
and `report_html.render_html`.

Only the standard library, click and policy_engine are imported here; Pillow is imported when
thumbnails are made.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..errors import PolicyEngineError
from .report_html import render_html
from .report_text import render_text
from .store import ResultStore
from .summary import EXAMPLES_PER_CATEGORY, summarize

__all__ = ["report_command", "write_html"]


def write_html(
    store: ResultStore,
    path: str | os.PathLike[str],
    *,
    thumbnails: int = EXAMPLES_PER_CATEGORY,
    thumb_size: int = 160,
) -> None:
    """Write the report as one self-contained HTML file (nothing external is referenced).

    `thumbnails` flagged examples at most per category, and as many Safe examples (see
    `summarize`), each shrunk to fit
    `thumb_size` pixels square; a source that is not a readable image file gets a placeholder
    saying why. Relative sources are looked up from the current directory, then from the
    results file's directory. Raises StoreError if the store cannot be read, OSError if `path`
    cannot be written.
    """
    if thumb_size < 1:
        raise ValueError(f"thumb_size must be >= 1, got {thumb_size}")
    summary = summarize(store, examples=thumbnails)
    page = render_html(summary, thumb_size=thumb_size, base_dir=Path(store.path).parent)
    Path(path).write_text(page, encoding="utf-8")


@click.command("report")
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path),
    help="Also write a self-contained HTML report to this file.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--thumbnails",
    type=click.IntRange(min=0),
    default=EXAMPLES_PER_CATEGORY,
    show_default=True,
    help="Flagged examples kept (and thumbnails shown) per category, and Safe examples.",
)
def report_command(results: Path, html_out: Path | None, as_json: bool, thumbnails: int) -> None:
    """Summarize a RESULTS file (audit, or eval --out): which model and decoding made the
    verdicts, counts, errors, throughput, scores.

    Prints a text summary (or JSON with --json) on stdout; --html also writes one
    self-contained HTML file with charts, blurred thumbnails of flagged images and a sample
    of Safe ones. Verdicts of a random-weights model come with a warning in every form.
    """
    try:
        with ResultStore(results) as store:
            summary = summarize(store, examples=thumbnails)
            if html_out is not None:
                page = render_html(summary, base_dir=results.parent)
                try:
                    html_out.write_text(page, encoding="utf-8")
                except OSError as err:
                    raise PolicyEngineError(
                        f"{html_out}: cannot write the report ({err.strerror or err})"
                    ) from None
    except PolicyEngineError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(render_text(summary), nl=False)
    if html_out is not None:
        click.echo(f"wrote {html_out}", err=True)
