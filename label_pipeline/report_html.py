"""The run report as one self-contained HTML page: plots and contact sheets are inline data URIs.

No script, no external resource: the file opens from disk in any browser and can be mailed or
attached to a ticket. Plots are matplotlib SVGs (no pyplot state, fixed ids and no date, so the same
numbers give the same bytes); contact sheets are PNGs drawn by ``label_pipeline.contact_sheet``.
"""

from __future__ import annotations

import base64
import datetime
import html
import importlib.metadata
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from label_pipeline.label_stats import (
    CONSTANT_FLAG_SHARE,
    EMPTY_FLAG_SHARE,
    NORMAL_BINS,
    PER_IMAGE,
    TaskStats,
)
from label_pipeline.report import Report, Sheet, report_flags

MAX_RUNS_PLOTTED = 8
THROUGHPUT_WINDOWS = 60  # points per run in the images/s plot
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;
background:#f4f6f8}
main{max-width:1240px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}
h2{font-size:18px;margin:28px 0 8px;border-bottom:2px solid #d5dbe1;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
.meta{color:#5b6773;margin:0 0 12px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}
.card span{color:#5b6773;font-size:12px}
.card.bad{border-color:#c62828;background:#fff5f5}
.flag{background:#fff4e5;border-left:4px solid #e65100;padding:6px 10px;margin:4px 0}
.ok{color:#2e7d32}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right}
.expert{background:#fff;border:1px solid #d5dbe1;border-radius:6px;padding:4px 14px 10px;margin:10px 0}
img.plot{max-width:100%;height:auto;display:block}
.sheet{margin:10px 0;background:#fff;border:1px solid #d5dbe1;padding:6px}
.sheet img{max-width:100%;height:auto;display:block}
.caption{font-size:12px;color:#5b6773;margin:2px 0 4px}
footer{color:#5b6773;font-size:12px;margin-top:30px}
code{background:#e9edf1;padding:0 3px;border-radius:3px}
"""


def render_html(report: Report) -> str:
    """The whole page."""
    body = [
        _header(report),
        _summary(report),
        _flags(report),
        _failures(report),
        _throughput(report),
        _experts(report),
        _gallery(report),
        _footer(report),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>label-pipeline report: {_e(report.root)}</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    right = set(numeric)
    head = "".join(f"<th{' class=n' if i in right else ''}>{_e(h)}</th>" for i, h in enumerate(headers or ()))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in right else ''}>{_e(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _card(label: str, value: Any, bad: bool = False) -> str:
    return f"<div class='card{' bad' if bad else ''}'><b>{_e(value)}</b><span>{_e(label)}</span></div>"


def _header(report: Report) -> str:
    status = report.status
    experts = ", ".join(f"{t} ({n})" for t, n in report.experts.items()) or "none recorded"
    return (
        f"<h1>Run report</h1><p class=meta><code>{_e(report.root)}</code> · dataset "
        f"<b>{_e(status.dataset)}</b> · experts: {_e(experts)}</p>"
    )


# -- summary -----------------------------------------------------------------------------------------
def _summary(report: Report) -> str:
    status, records = report.status, report.records
    failed_samples = records.samples - records.status.get("ok", 0)
    wall = sum(float(r.get("elapsed_s") or 0.0) for r in report.runs)
    rate = _overall_rate(report)
    cards = [
        _card("shards done", status.done),
        _card("shards failed", len(status.failed), bad=bool(status.failed)),
        _card("shards damaged", len(status.damaged), bad=bool(status.damaged)),
        _card("shards stale (input changed)", len(status.stale_inputs), bad=bool(status.stale_inputs)),
        _card("shards pending", "?" if status.pending is None else status.pending),
        _card("samples", f"{records.samples:,}"),
        _card("samples not ok", f"{failed_samples:,}", bad=failed_samples > 0),
        _card("wall time (runs with statistics)", _duration(wall) if report.runs else "no statistics"),
        _card("images/s", f"{rate:.1f}" if rate else "–"),
    ]
    return f"<h2>Summary</h2><div class=cards>{''.join(cards)}</div>"


def _overall_rate(report: Report) -> float | None:
    samples = sum(int(r.get("samples") or 0) for r in report.runs)
    elapsed = sum(float(r.get("elapsed_s") or 0.0) for r in report.runs)
    if elapsed > 0:
        return samples / elapsed
    busy = sum(duration for _, _, duration in report.commits)
    return sum(n for _, n, _ in report.commits) / busy if busy > 0 else None


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- flags ---------------------------------------------------------------------------------------------
def _flags(report: Report) -> str:
    found = report_flags(report)
    if not found:
        return (
            "<h2>Flags</h2><p class=ok>Nothing suspicious: no expert is empty on more than "
            f"{EMPTY_FLAG_SHARE:.0%} of the sampled labels or constant on more than "
            f"{CONSTANT_FLAG_SHARE:.0%}, and no shard is failed or damaged.</p>"
        )
    shown = found[:50]
    more = f"<p>… and {len(found) - len(shown)} more.</p>" if len(found) > len(shown) else ""
    return "<h2>Flags</h2>" + "".join(f"<div class=flag>{_e(f)}</div>" for f in shown) + more


# -- failures ------------------------------------------------------------------------------------------
def _failures(report: Report) -> str:
    records, status = report.records, report.status
    parts = ["<h2>Failures</h2>"]
    not_ok = {s: c for s, c in records.status.items() if s != "ok"}
    if not not_ok and not status.failed:
        parts.append(f"<p class=ok>All {records.samples:,} samples are ok.</p>")
    if not_ok:
        examples: dict[str, tuple[str, int]] = {}
        for (state, error), count in records.errors.most_common():
            examples.setdefault(state, (error, count))
        rows = [
            (
                state,
                f"{count:,}",
                f"{count / max(records.samples, 1):.2%}",
                examples.get(state, ("", 0))[0][:160],
            )
            for state, count in sorted(not_ok.items(), key=lambda item: -item[1])
        ]
        parts.append("<h3>Samples by status</h3>")
        parts.append(_table(["status", "samples", "share", "most common error"], rows, numeric=(1, 2)))
    expert_rows = []
    for task, outcomes in sorted(records.experts.items()):
        total = sum(outcomes.values())
        bad = {s: c for s, c in outcomes.items() if s != "ok"}
        if bad:
            detail = ", ".join(f"{s} {c:,}" for s, c in sorted(bad.items()))
            expert_rows.append((task, f"{sum(bad.values()):,}", f"{sum(bad.values()) / total:.2%}", detail))
    if expert_rows:
        parts.append("<h3>Experts that did not label a sample</h3>")
        parts.append(_table(["expert", "samples", "share", "outcomes"], expert_rows, numeric=(1, 2)))
    if records.failures_by_shard:
        top = records.failures_by_shard.most_common(20)
        parts.append("<h3>Where failures cluster</h3>")
        parts.append(
            _img(_bar_figure([s for s, _ in top], [c for _, c in top], "failed samples per shard (top 20)"))
        )
    if status.failed:
        parts.append("<h3>Failed shards</h3>" + _table(["shard", "error"], sorted(status.failed.items())))
    return "".join(parts)


# -- throughput -----------------------------------------------------------------------------------------
def _throughput(report: Report) -> str:
    parts = ["<h2>Throughput</h2>"]
    figure = _throughput_figure(report)
    if figure is None:
        parts.append(
            "<p>Not enough data for a plot: no run statistics with throughput points, and fewer than "
            "two shard commits with times.</p>"
        )
    else:
        parts.append(_img(figure))
    if report.runs:
        rows = [
            (
                r.get("created", "?"),
                r.get("runner", "?"),
                r.get("status", "?"),
                f"{int(r.get('samples') or 0):,}",
                _duration(float(r.get("elapsed_s") or 0.0)),
                f"{float(r.get('images_per_s') or 0.0):.1f}",
            )
            for r in report.runs
        ]
        parts.append("<h3>Runs (OUT/stats/)</h3>")
        parts.append(
            _table(
                ["started", "runner", "status", "samples", "wall time", "images/s"], rows, numeric=(3, 4, 5)
            )
        )
        parts.append(_busy_table(report.runs))
    else:
        parts.append(
            "<p>No run statistics in <code>OUT/stats/</code>: wall time and per-expert busy time are "
            "unknown; the plot above, if any, comes from the shards' commit times.</p>"
        )
    return "".join(parts)


def _busy_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for run in runs[-MAX_RUNS_PLOTTED:]:
        experts = run.get("experts")
        for task, entry in sorted(experts.items() if isinstance(experts, dict) else ()):
            if not isinstance(entry, dict):
                continue
            busy = float(entry.get("busy_s") or 0.0)
            images = int(entry.get("images") or 0)
            fraction = entry.get("busy_fraction")
            rows.append(
                (
                    run.get("created", "?"),
                    task,
                    f"{images:,}",
                    _duration(busy),
                    f"{images / busy:.1f}" if busy > 0 else "–",
                    f"{fraction:.0%}" if isinstance(fraction, int | float) else "–",
                )
            )
    if not rows:
        return ""
    headers = ["run", "expert", "images", "busy time", "images/s while busy", "busy share of wall time"]
    return "<h3>Per-expert busy time</h3>" + _table(headers, rows, numeric=(2, 3, 4, 5))


def _run_rates(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    points = run.get("throughput")
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 2 or array[-1, 0] <= 0:
        return None
    # Resample cumulative samples on an even grid, then differentiate: a steady rate per window.
    grid = np.linspace(0.0, array[-1, 0], THROUGHPUT_WINDOWS + 1)
    done = np.interp(grid, array[:, 0], array[:, 1])
    return grid[1:], np.diff(done) / np.diff(grid)


def _throughput_figure(report: Report) -> Figure | None:
    series = [(r, curve) for r in report.runs[-MAX_RUNS_PLOTTED:] if (curve := _run_rates(r)) is not None]
    if series:
        figure, (axis,) = _figure(1)
        scale, unit = _time_unit(max(float(seconds[-1]) for _, (seconds, _) in series))
        for run, (seconds, rates) in series:
            axis.plot(seconds / scale, rates, label=f"{run.get('created', '?')} ({run.get('runner', '?')})")
        axis.set(
            xlabel=f"{unit} since the run started", ylabel="images/s", title="images/s over time, per run"
        )
        axis.legend(fontsize=8)
        return figure
    if len(report.commits) < 2:
        return None
    starts = np.array([t - d for t, _, d in report.commits])
    ends = np.array([t for t, _, _ in report.commits])
    samples = np.array([n for _, n, _ in report.commits], dtype=np.float64)
    origin = starts.min()
    edges = np.linspace(0.0, max(ends.max() - origin, 1.0), min(THROUGHPUT_WINDOWS, len(ends)) + 1)
    committed, _ = np.histogram(ends - origin, bins=edges, weights=samples)
    figure, (axis,) = _figure(1)
    scale, unit = _time_unit(float(edges[-1]))
    axis.step(edges[1:] / scale, committed / np.diff(edges), where="pre")
    axis.set(
        xlabel=f"{unit} since the first shard started",
        ylabel="images/s (committed)",
        title="images/s over time, from the shards' commit times",
    )
    return figure


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds < 180:
        return 1.0, "seconds"
    return (60.0, "minutes") if seconds < 3 * 3600 else (3600.0, "hours")


# -- experts -------------------------------------------------------------------------------------------
def _experts(report: Report) -> str:
    sampled = sum(report.sampled.values())
    parts = [
        "<h2>Labels per expert</h2>",
        f"<p>Outcomes over all {report.records.samples:,} records; distributions over {sampled:,} samples "
        f"read from {len(report.sampled)} shards (the first samples of shards drawn with seed "
        f"{report.options.seed}).</p>",
    ]
    tasks = sorted(set(report.labels) | set(report.records.experts))
    if not tasks:
        parts.append("<p>No expert labels in this output.</p>")
    for task in tasks:
        parts.append(_expert_section(report, task))
    return "".join(parts)


def _expert_section(report: Report, task: str) -> str:
    stats = report.labels.get(task)
    outcomes: Counter = report.records.experts.get(task) or Counter()
    name = report.experts.get(task, task)
    parts = [f"<div class=expert><h3>{_e(task)} <small>({_e(name)})</small></h3>"]
    rows = [("labelled ok (all records)", f"{outcomes.get('ok', 0):,}")]
    rows += [(f"{s} (all records)", f"{c:,}") for s, c in sorted(outcomes.items()) if s != "ok"]
    if stats is not None and stats.samples:
        rows.append(("labels read for the statistics", f"{stats.samples:,}"))
        if stats.kind not in ("depth", "normal"):
            rows.append(("empty labels", f"{stats.empty_share:.1%}"))
        rows.append(("constant maps", f"{stats.constant_share:.1%}" if stats.kind != "array" else "–"))
        if stats.per_image:
            values = np.asarray(stats.per_image, dtype=np.float64)
            rows.append(
                (
                    f"{PER_IMAGE.get(stats.kind, 'per image')}: mean / median / max",
                    f"{values.mean():.3g} / {np.median(values):.3g} / {values.max():.3g}",
                )
            )
    parts.append(_table(None, rows, numeric=(1,)))
    flagged = [f for f in report_flags(report) if f.startswith(f"{task}: ")]
    parts += [f"<div class=flag>{_e(f)}</div>" for f in flagged]
    if stats is None or not stats.samples:
        parts.append("<p>No label of this expert in the sampled shards.</p>")
    else:
        parts.append(_img(_expert_figure(stats)))
        parts.append(_class_table(stats))
    parts.append("</div>")
    return "".join(parts)


def _class_table(stats: TaskStats) -> str:
    if stats.kind == "words" and stats.words:
        rows = [(word or "(empty)", f"{count:,}") for word, count in stats.words.most_common(15)]
        return "<h4>Most frequent words</h4>" + _table(["word", "count"], rows, numeric=(1,))
    top = stats.top_classes(15) if stats.kind in ("classes", "instances") else []
    if not top:
        return ""
    what = "pixel share" if stats.kind == "classes" else "instance share"
    shares = [(name, f"{share:.1%}", f"{stats.class_images[i]:,}") for i, name, share in top]
    return "<h4>Most frequent classes</h4>" + _table(
        ["class", what, "images with it"], shares, numeric=(1, 2)
    )


def _expert_figure(stats: TaskStats) -> Figure:
    values = np.asarray(stats.per_image, dtype=np.float64)
    if stats.kind in ("words", "array"):
        figure, (axis,) = _figure(1)
        _histogram(axis, values, PER_IMAGE[stats.kind], integer=True)
        return figure
    if stats.kind == "map":
        figure, (axis,) = _figure(1)
        _value_histogram(axis, stats, "map values", log=True)
        return figure
    # Class names label the bars of the class-frequency plot: give them room on the left.
    figure, (left, right) = _figure(2, left_inches=1.7 if stats.kind in ("classes", "instances") else 0.8)
    if stats.kind == "normal":
        _normal_plots(stats, left, right)
    elif stats.kind in ("classes", "instances"):
        top = stats.top_classes(15)[::-1]
        left.barh([name for _, name, _ in top], [share for _, _, share in top], color="#1565c0")
        left.set(
            xlabel="pixel share" if stats.kind == "classes" else "instance share", title="class frequency"
        )
        left.tick_params(axis="y", labelsize=7)
        _histogram(right, values, PER_IMAGE[stats.kind], integer=True)
    elif stats.kind == "edge":
        _value_histogram(
            left, stats, "values of edge pixels (0 = strongest; 255 = no edge, left out)", top=255
        )
        _histogram(right, values, PER_IMAGE["edge"])
    else:
        _value_histogram(left, stats, "depth values (255 = near)")
        _histogram(right, values, PER_IMAGE["depth"])
    return figure


def _normal_plots(stats: TaskStats, left: Any, right: Any) -> None:
    total = max(int(stats.normal_xy.sum()), 1)
    shown = left.imshow(stats.normal_xy / total, origin="lower", extent=(-1, 1, -1, 1), cmap="viridis")
    left.figure.colorbar(shown, ax=left, fraction=0.046)
    left.set(xlabel="n.x", ylabel="n.y", title="normal direction (x, y) density")
    edges = np.linspace(-1, 1, NORMAL_BINS + 1)
    right.bar(
        edges[:-1], stats.normal_z / max(int(stats.normal_z.sum()), 1), width=np.diff(edges), align="edge"
    )
    right.set(xlabel="n.z", ylabel="share of pixels", title="normal z component")


def _value_histogram(axis: Any, stats: TaskStats, title: str, top: int = 256, log: bool = False) -> None:
    """Pixel values in bins of 8 (values from ``top`` on are left out, e.g. the no-edge 255)."""
    counts = stats.values[:top].astype(np.float64)
    binned = np.add.reduceat(counts, np.arange(0, top, 8))
    axis.bar(np.arange(0, top, 8), binned / max(counts.sum(), 1.0), width=8, align="edge", color="#2e7d32")
    axis.set(xlabel="value", ylabel="share of pixels", title=title, xlim=(0, 256))
    if log:
        axis.set_yscale("log")


def _histogram(axis: Any, values: np.ndarray, title: str, integer: bool = False) -> None:
    if not len(values):
        axis.set(title=title)
        return
    top = int(values.max())
    bins = np.arange(-0.5, top + 1.5, max(1, (top + 1) // 40)) if integer else 30
    axis.hist(values, bins=bins, color="#6a1b9a")
    axis.set(xlabel=title, ylabel="images", title=title)
    if integer:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


# -- gallery -------------------------------------------------------------------------------------------
def _gallery(report: Report) -> str:
    parts = ["<h2>Contact sheets</h2>"]
    parts.append(
        f"<h3>A random sample ({len(report.gallery)})</h3>"
        if report.gallery
        else "<p>No sample to draw (no shard was read).</p>"
    )
    parts += [_sheet(s) for s in report.gallery]
    if report.failure_sheets:
        failures = {f"{f.shard}/{f.key}": f for f in report.records.failures}
        parts.append(f"<h3>Failed samples ({len(report.failure_sheets)}, each kind of failure in turn)</h3>")
        for sheet in report.failure_sheets:
            failure = failures.get(sheet.title)
            detail = ""
            if failure is not None:
                experts = ", ".join(f"{t}: {s}" for t, s in sorted(failure.experts.items()))
                detail = f"status {failure.status}" + (f" — {failure.error}" if failure.error else "")
                detail += f" — experts {experts}" if experts else ""
            parts.append(_sheet(sheet, detail))
    elif report.records.failures:
        parts.append("<p>Failed samples could not be drawn (their shards did not read).</p>")
    return "".join(parts)


def _sheet(sheet: Sheet, detail: str = "") -> str:
    caption = _e(sheet.title) + (f" · {_e(detail)}" if detail else "")
    return (
        f"<div class=sheet><div class=caption>{caption}</div>"
        f"<img alt='{_e(sheet.title)}' src='{_png_uri(sheet.image)}'></div>"
    )


def _footer(report: Report) -> str:
    try:
        version = importlib.metadata.version("prismer-label-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in report.timings.items())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    options = report.options
    return (
        f"<footer>label-pipeline {_e(version)} · generated {now} · sample: up to {options.samples} labels "
        f"from up to {options.shards} shards, seed {options.seed} · computed in {_e(timings)}</footer>"
    )


# -- images --------------------------------------------------------------------------------------------
def _figure(columns: int, left_inches: float = 0.8) -> tuple[Figure, list[Any]]:
    """Fixed margins: matplotlib's constrained layout would double the drawing time of a report."""
    width = 5.6 * columns
    figure = Figure(figsize=(width, 3.4))
    figure.subplots_adjust(left=left_inches / width, right=0.98, bottom=0.16, top=0.9, wspace=0.3)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _bar_figure(labels: list[str], values: list[int], title: str) -> Figure:
    figure, (axis,) = _figure(1)
    axis.bar(range(len(values)), values, color="#c62828")
    axis.set_xticks(range(len(values)), labels, rotation=60, fontsize=7)
    axis.figure.subplots_adjust(bottom=0.28)
    axis.set(ylabel="samples", title=title)
    return figure


def _img(figure: Figure) -> str:
    with matplotlib.rc_context({"svg.hashsalt": "label-pipeline-report", "svg.fonttype": "none"}):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class=plot alt='plot' src='data:image/svg+xml;base64,{data}'>"


def _png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
