"""`evaluation_report.html`: the whole report in one file a browser opens with no network (styles, the sorting
script and the plots, as PNG data, are inside it).

Sections: the summary (which method's lead holds), every run's row (sortable: click a column's header), each
method's means with their 95% intervals, the paired comparisons (every metric), the cost, training and reward
curves, generation samples side by side, and the study's manifest (study.json) where the folder has one.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from tunefleet.eval import statistics as stats

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
td.text, th.text { text-align: left; }
th { background: #f4f4f4; }
table.sortable th { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
td.best { font-weight: bold; background: #eef6ee; }
tr.error td { color: #a00; }
.holds { color: #060; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em .5em 0 0; }
pre { background: #f7f7f7; padding: 1em; overflow: auto; font-size: 12px; }
.answers td { text-align: left; max-width: 50em; white-space: pre-wrap; }
.note { color: #666; }
"""

# Sorting: numbers by their data-value (a missing value sorts last), other cells by their text.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("thead th").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column];
        var value = cell.getAttribute("data-value");
        if (value === null || value === "") return null;
        var number = Number(value);
        return isNaN(number) ? value : number;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null && y === null) return 0;
        if (x === null) return 1;
        if (y === null) return -1;
        var order = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def cell(value, pattern: str = "{}", css: str = "") -> str:
    """A table cell whose data-value sorts: the number itself, or the text."""
    if value is None or (isinstance(value, float) and value != value):
        return f'<td class="{css}" data-value="">–</td>'
    text = pattern.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
    return f'<td class="{css}" data-value="{esc(value)}">{esc(text)}</td>'


def table(headers: list[str], rows: list[str], css: str = "sortable", table_id: str = "") -> str:
    head = "".join(f'<th class="{"text" if i == 0 else ""}">{esc(h)}</th>' for i, h in enumerate(headers))
    ident = f' id="{table_id}"' if table_id else ""
    return f'<table class="{css}"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def results_section(rows: list[tuple[str, dict]], shown: list[tuple[str, str, str]], best: dict, stderr) -> str:
    out = []
    for name, entry in rows:
        cells = [cell(name, css="text")]
        for key, _, pattern in shown:
            value = entry.get(key)
            text_pattern = pattern
            error = stderr(entry, key)
            if error is not None and isinstance(value, (int, float)):
                text_pattern = pattern + f" ± {error:.3f}"
            css = "text" if key in ("method", "stage") else ("best" if key in best and value == best[key] else "")
            cells.append(cell(value, text_pattern, css))
        css = ' class="error"' if entry.get("error") else ""
        title = f' title="{esc(entry["error"])}"' if entry.get("error") else ""
        out.append(f'<tr data-run="{esc(name)}"{css}{title}>{"".join(cells)}</tr>')
    headers = ["run"] + [h for _, h, _ in shown]
    return table(headers, out, table_id="results")


def interval_section(found: dict, metrics: list[str]) -> str:
    rows = []
    for label, numbers in found["intervals"].items():
        if label == "base" or label.startswith("parent:"):
            continue
        seeds = max((n["n"] for n in numbers.values()), default=0)
        cells = [cell(label, css="text"), cell(seeds)]
        for metric in metrics:
            n = numbers.get(metric)
            if not n:
                cells.append(cell(None))
            elif n["ci95"] is None:
                cells.append(f'<td data-value="{n["mean"]}">{n["mean"]:.4f} <span class="note">(1 seed)</span></td>')
            else:
                low, high = n["ci95"]
                cells.append(f'<td data-value="{n["mean"]}">{n["mean"]:.4f} [{low:.4f}, {high:.4f}]</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return table(["method", "seeds", *metrics], rows, table_id="intervals")


def comparison_section(found: dict) -> str:
    rows = []
    for c in found["comparisons"]:
        ci = f"[{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c["ci95"] else "–"
        holds = '<td class="holds" data-value="1">yes</td>' if c["significant"] else '<td data-value="0">no</td>'
        rows.append(
            "<tr>"
            + cell(c["metric"], css="text")
            + cell(c["a"], css="text")
            + cell(c["b"], css="text")
            + cell(c["difference"], "{:+.4f}")
            + f'<td data-value="{c["ci95"][0] if c["ci95"] else ""}">{esc(ci)}</td>'
            + cell(c["p_value"], "{:.4f}")
            + cell(c["p_holm"], "{:.4f}")
            + holds
            + cell(c["units"])
            + cell(c["note"] or "", css="text")
            + "</tr>"
        )
    headers = ["metric", "A", "B", "A − B", "95% bootstrap interval", "p", "p (Holm)", "holds", "units", "note"]
    return table(headers, rows, table_id="comparisons")


def cost_section(cost: dict) -> str:
    rows = []
    for run in cost["runs"]:
        rows.append(
            "<tr>"
            + cell(run["run"], css="text")
            + cell(run.get("wall_seconds"), "{:.1f}")
            + cell(run.get("gpu_hours"), "{:.4f}")
            + cell(run.get("tokens_trained"), "{:,}")
            + cell(run.get("tokens_per_second"), "{:,.0f}")
            + cell(run.get("peak_gpu_mb") or run.get("peak_rss_mb"), "{:,.0f}")
            + cell(run.get("energy_joules"), "{:,.0f}")
            + cell(run.get("money"), "{:.4f}")
            + "</tr>"
        )
    headers = ["run", "wall s", "GPU-hours", "tokens trained", "tokens/s", "peak MiB", "energy J", "money"]
    total = cost["total"]
    summary = (
        f"<p>Study: {total['runs']} runs, {total['wall_seconds']:.0f} s of run time, "
        f"{total['gpu_hours']:.4f} GPU-hours, {total['tokens_trained']:,} tokens trained"
        + (f", {total['energy_joules']:,.0f} J" if total.get("energy_joules") is not None else ", energy: no NVML")
        + (f", money: {total['money']:.4f} at {cost['gpu_hour_price']} per GPU-hour" if cost["gpu_hour_price"] else "")
        + ".</p>"
    )
    return summary + table(headers, rows, table_id="cost")


def image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{esc(path.stem)}" src="data:image/png;base64,{data}">'


def samples_section(prompts: list[tuple[str, list[tuple[str, dict]]]]) -> str:
    """Per sampled prompt (report.samples_by_prompt): every run's answer side by side, with its reward."""
    if not prompts:
        return "<p>No generation samples.</p>"
    out = []
    for i, (prompt, answers) in enumerate(prompts):
        body = [
            "<tr>"
            + cell(name, css="text")
            + cell(sample["response"] or "(empty)", css="text")
            + cell(sample.get("reward"), "{:.2f}")
            + "</tr>"
            for name, sample in answers
        ]
        out.append(
            f"<h3>Prompt {i + 1}</h3><p>{esc(prompt)}</p>" + table(["run", "answer", "reward"], body, "answers")
        )
    return "".join(out)


def page(
    title: str,
    summary: list[str],
    results_html: str,
    intervals_html: str,
    comparisons_html: str,
    cost_html: str,
    plots: list[Path],
    samples_html: str,
    manifest: dict | None,
) -> str:
    """The whole self-contained page."""
    items = "".join(f"<li>{esc(line)}</li>" for line in summary) or "<li>No per-prompt scores to compare.</li>"
    manifest_html = (
        f"<pre id='manifest'>{esc(json.dumps(manifest, indent=2))}</pre>"
        if manifest
        else "<p>No study.json here (a sweep writes one).</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<h2>Summary</h2><ul id="summary">{items}</ul>
<h2>Runs</h2><p class="note">Click a header to sort. Bold: best in column. Benchmarks: value ± lm-eval stderr.</p>
{results_html}
<h2>Per method: mean and 95% t interval over seeds</h2>{intervals_html}
<h2>Paired comparisons</h2>
<p class="note">A − B over the same held-out prompts, seeds matched in order; percentile bootstrap interval
({stats.RESAMPLES} resamples); p from a paired permutation test; Holm's correction over each metric's
comparisons; holds: p (Holm) &lt; {stats.ALPHA}.</p>
{comparisons_html}
<h2>Cost</h2>{cost_html}
<h2>Curves and metrics</h2><div id="plots">{"".join(image(p) for p in plots if p.exists())}</div>
<h2>Generation samples</h2>{samples_html}
<h2>Manifest</h2>{manifest_html}
<script>{SCRIPT}</script>
</body></html>
"""
