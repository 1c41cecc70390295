"""The report of a results file as text for a terminal: `render_text` of a `Summary`.

A random-weights warning, when there is one, is the first line: nobody should read the counts
below it as an assessment of the images."""

from __future__ import annotations

from collections import Counter

from .summary import Summary, duration, percent, utc_time

__all__ = ["render_text"]


def render_text(summary: Summary) -> str:
    """A readable summary for a terminal."""
    lines = [f"WARNING: {_t(w)}" for w in summary.warnings]
    lines.append(f"Audit report: {_t(summary.file)}")
    policy = summary.policy_id or "(unknown policy)"
    if summary.policy_version:
        policy += f" v{summary.policy_version}"
    if summary.policy_hash:
        policy += f" ({summary.policy_hash})"
    meta = summary.meta
    provenance = summary.provenance
    header = [
        ("policy", policy),
        ("model", provenance.model or "(not recorded)"),
        ("decoding", provenance.decoding_text),
        ("backend", _join(meta.get("backend"), meta.get("mode") and f"mode {meta['mode']}")),
        ("source", _join(meta.get("source"), meta.get("shard") and f"shard {meta['shard']}")),
        ("started", utc_time(summary.started)),
        ("finished", utc_time(summary.finished)),
    ]
    if summary.throughput:
        t = summary.throughput
        basis = "audit start to finish" if t.basis == "meta" else "estimated from the rows"
        rate = f"{t.images_per_second:.2f} images/s over {duration(t.seconds)} ({basis})"
        header.append(("throughput", rate))
    if summary.generation_seconds is not None:
        header.append(("model time", f"{summary.generation_seconds:.1f} s"))
    lines += [f"  {key:<11}{_t(value)}" for key, value in header if value]
    lines.append("")
    if not summary.rows:
        lines.append("no results yet")
        return "\n".join(lines) + "\n"

    done = f"{summary.rows}"
    if summary.expected is not None:
        done += f" of {summary.expected}"
    lines += [
        "Totals",
        f"  {'rows':<11}{done}",
        f"  {'ok':<11}{summary.ok}",
        f"  {'errors':<11}{summary.errors}",
        f"  {'flagged':<11}{summary.flagged} ({percent(summary.flagged, summary.rows)})",
        "",
    ]
    lines += _text_counts("Ratings", summary.ratings, summary.rows)
    if summary.categories:
        lines.append("Categories (rows, flagged)")
        width = max(len(_t(cid)) for cid in summary.categories)
        for cid, stats in summary.categories.items():
            name = f"  {_t(stats.name)}" if stats.name else ""
            lines.append(f"  {_t(cid):<{width}}  {stats.rows:>7} {stats.flagged:>7}{name}")
        lines.append("")
    lines += _text_counts(
        "Severities (the policy's scale, lowest first)", summary.severities_in_order(), summary.rows
    )
    lines += _text_counts("Actions (rows carrying each)", summary.actions, summary.rows)
    lines += summary.shadow.text_lines(_t)
    if summary.error_groups:
        lines.append("Errors")
        for kind, group in summary.error_groups.items():
            lines.append(f"  {_t(kind)}: {group.count}")
            lines += [f"    {_t(e['id'])}: {_t(e['message'])}" for e in group.examples]
        lines.append("")
    lines += _text_parts(summary)
    if summary.p_unsafe.count:
        hist = summary.p_unsafe
        lines.append(f"p_unsafe (n={hist.count}, mean {hist.mean:.3f})")
        peak = max(hist.counts)
        for i, count in enumerate(hist.counts):
            bar = "#" * round(30 * count / peak) if peak else ""
            low, high = hist.edges[i], hist.edges[i + 1]
            lines.append(f"  {low:.1f}-{high:.1f} {count:>7} {bar}")
        lines.append("")
    return "\n".join(lines)


def _text_parts(summary: Summary) -> list[str]:
    """The kept flagged examples that are videos or posts, with their flagged parts."""
    shown = [e for c in summary.categories.values() for e in c.examples if e.parts]
    if not shown:
        return []
    lines = ["Flagged videos and posts (kept examples; deciding part first)"]
    for example in shown:
        lines.append(f"  {_t(example.id)}: {_t(example.category_id or '')}")
        lines += [f"    {_t(part.label())}" for part in example.parts]
    return [*lines, ""]


def _text_counts(title: str, counts: Counter[str] | list[tuple[str, int]], rows: int) -> list[str]:
    """Rows per key with their share; a Counter by count, a list in its own order."""
    items = counts.most_common() if isinstance(counts, Counter) else counts
    if not items:
        return []
    width = max(len(_t(k)) for k, _ in items)
    out = [title]
    for key, count in items:
        out.append(f"  {_t(key):<{width}}  {count:>7}  {percent(count, rows)}")
    return [*out, ""]


def _t(value: object) -> str:
    """Data made safe for one line of a terminal: no line breaks, no control sequences."""
    text = " ".join(str(value).splitlines())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _join(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p)
