"""The HTML report's stylesheet (inline in the page: no file, font or server is referenced).

The blur works without JavaScript: each flagged thumbnail sits in a `<label>` with a visually
hidden checkbox, and `:checked` lifts the blur; a checkbox placed before the page
(`#reveal-all`) lifts every blur at once. The checkboxes stay focusable, so Tab and Space
reveal a picture too.
"""

from __future__ import annotations

__all__ = ["CSS"]

CSS = """
:root { --safe: #2e7d32; --unsafe: #c62828; --neutral: #1565c0; --error: #6d4c41;
  --action: #6a1b9a; --line: #ddd; --muted: #666; --track: #f1f1f1; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
  margin: 0; }
.page { margin: 0 auto; max-width: 1200px; padding: 16px 24px; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 18px; border-bottom: 1px solid var(--line); padding-bottom: 4px; margin-top: 28px; }
.banner { background: #fdecea; border: 2px solid var(--unsafe); border-radius: 6px;
  color: #7f1d1d; padding: 10px 14px; margin: 0 0 14px; font-size: 15px; }
.banner strong { display: block; font-size: 17px; text-transform: uppercase; }
.banner p { margin: 4px 0 0; }
header dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
header dt { color: var(--muted); }
header dd { margin: 0; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
.tag { color: #fff; border-radius: 4px; padding: 0 6px; font-size: 12px; margin-left: 4px; }
.tag.unsafe { background: var(--unsafe); }
nav { margin: 16px 0; overflow-wrap: anywhere; display: flex; flex-wrap: wrap; gap: 4px 8px;
  align-items: center; }
nav a { color: var(--neutral); text-decoration: none; }
.button { margin-left: auto; border: 1px solid var(--neutral); color: var(--neutral);
  border-radius: 4px; padding: 2px 10px; cursor: pointer; user-select: none; }
.when-revealed { display: none; }
#reveal-all:checked ~ .page .when-revealed { display: inline; }
#reveal-all:checked ~ .page .when-blurred { display: none; }
#reveal-all:focus-visible ~ .page .button { outline: 2px solid var(--neutral); }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.tile b { display: block; font-size: 20px; }
.tile span { color: var(--muted); }
.charts { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; }
figure.chart { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px;
  flex: 1 1 360px; max-width: 100%; }
figure.chart.wide { flex-basis: 520px; }
figure.chart.histogram { flex: 0 1 auto; }
figure.chart > figcaption { font-weight: 600; margin-bottom: 6px; }
.bars { display: grid; grid-template-columns: minmax(6em, max-content) minmax(80px, 1fr)
  max-content; gap: 4px 8px; align-items: center; }
.bar-label { overflow-wrap: anywhere; }
.bar-track { display: flex; height: 16px; background: var(--track); border-radius: 2px; }
.bar-track .seg { display: block; height: 100%; min-width: 2px; }
.bar-count { font-variant-numeric: tabular-nums; white-space: nowrap; color: #333; }
.seg.safe, .key.safe { background: var(--safe); }
.seg.unsafe, .key.unsafe { background: var(--unsafe); }
.seg.neutral, .key.neutral { background: var(--neutral); }
.seg.error, .key.error { background: var(--error); }
.seg.action, .key.action { background: var(--action); }
.legend { margin-top: 8px; font-size: 12px; color: #444; }
.legend ul { list-style: none; margin: 0; padding: 0; display: flex; flex-wrap: wrap;
  gap: 2px 14px; }
.legend .key { display: inline-block; width: 11px; height: 11px; margin-right: 5px;
  vertical-align: -1px; border-radius: 2px; }
.legend p { margin: 4px 0 0; color: var(--muted); }
svg { max-width: 100%; height: auto; font-size: 12px; display: block; }
svg text { fill: #222; }
svg .axis { stroke: #999; }
svg .safe { fill: var(--safe); } svg .unsafe { fill: var(--unsafe); }
table { border-collapse: collapse; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
td ul { margin: 0; padding-left: 18px; }
.facts, .note { color: var(--muted); }
.category-body { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.category-body > .gallery { flex: 1 1 400px; min-width: 0; }
.category-body > .gallery > .note:first-child { margin-top: 0; }
.empty { font-size: 18px; color: var(--muted); }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
.thumb { border: 1px solid var(--line); border-radius: 6px; padding: 6px; break-inside: avoid; }
.thumb img, .placeholder { display: block; margin: 0 auto; max-width: 100%; }
.toggle { position: absolute; opacity: 0; width: 1px; height: 1px; margin: 0; }
.reveal { position: relative; display: block; overflow: hidden; cursor: pointer;
  border-radius: 4px; width: fit-content; max-width: 100%; margin: 0 auto; }
.reveal img.blurred { filter: blur(18px) saturate(0.6); transform: scale(1.2); }
.reveal .hint { position: absolute; inset: 0; display: flex; align-items: center;
  justify-content: center; text-align: center; color: #fff; font-size: 12px; font-weight: 600;
  text-shadow: 0 0 3px #000, 0 0 6px #000; padding: 6px; }
.reveal .toggle:checked ~ img.blurred,
#reveal-all:checked ~ .page .reveal img.blurred { filter: none; transform: none; }
.reveal .toggle:checked ~ .hint, #reveal-all:checked ~ .page .reveal .hint { display: none; }
.reveal .toggle:focus-visible ~ img { outline: 3px solid var(--neutral); outline-offset: -3px; }
.placeholder { width: 160px; height: 120px; background: #f3f3f3; border: 1px dashed #aaa;
  color: var(--muted); display: flex; align-items: center; justify-content: center;
  text-align: center; padding: 8px; font-size: 12px; overflow: hidden; }
.thumb figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.thumb figcaption span, .thumb figcaption code { display: block; }
.thumb .src { color: var(--muted); }
.thumb .why { max-height: 7.5em; overflow: auto; border-top: 1px solid var(--line);
  margin-top: 4px; padding-top: 4px; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
@media print {
  .page { max-width: none; padding: 0; }
  nav { display: none; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  section.category { break-before: page; }
  .thumb .why { max-height: none; overflow: visible; }
  figure { break-inside: avoid; }
}
"""
