"""The picture of one experiment: each metric's relative lift per treatment with its 95% interval, as a PNG."""

from __future__ import annotations

import io
import math
import re
import zlib

from mixsync.experiments.analysis import ExperimentSummary
from mixsync.experiments.stats import SRM_ALPHA

SIGNIFICANT = 0.05
COLORS = {"better": "#1a7f37", "worse": "#cf222e", "unclear": "#57606a"}


def chart_file_name(split: str) -> str:
    """A file name for a split's chart; names with other characters than [A-Za-z0-9_.-] get a hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)[:100]
    if safe != split:
        safe += f"-{zlib.crc32(split.encode()):08x}"
    return f"{safe}.png"


def _percent(value: float) -> str:
    return f"{value * 100:+.1f}%"


def render_chart(summary: ExperimentSummary, results: list[tuple]) -> bytes:
    """A PNG of `results` (rows of analytics.experiment_results for this experiment)."""
    # Imported here, not with the code location: matplotlib costs a second or more of import in every Dagster
    # process. A bare Figure (no pyplot) draws with Agg, keeps no global state and imports faster.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    experiment = summary.experiment
    metrics = [m.name for m in experiment.metrics] or ["(no metrics configured)"]
    treatments = [t for t in sorted(summary.users) if t != experiment.control]
    height = 1.2 + 0.55 * max(1, len(treatments)) * len(metrics) + 0.35 * len(metrics)
    fig = Figure(figsize=(8, height), dpi=90)
    axes = fig.subplots(len(metrics), 1, squeeze=False)
    users = " · ".join(f"{t} {summary.users[t]:,}" for t in sorted(summary.users, key=lambda t: t != experiment.control))
    title = f"{experiment.split}: relative lift vs control {experiment.control!r}, 95% CI\nusers: {users}"
    if summary.users_multiple_treatments:
        title += f" · {summary.users_multiple_treatments:,} excluded (saw several treatments)"
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    notes = []
    if summary.srm_p_value is not None and summary.srm_p_value < SRM_ALPHA:
        notes.append(f"SAMPLE RATIO MISMATCH (p = {summary.srm_p_value:.2g}): groups may not be comparable")
    if summary.users_window_incomplete:
        notes.append(f"{summary.users_window_incomplete:,} users' {experiment.window_days}-day windows are not over yet")
    by_key = {(row[1], row[2]): row for row in results}
    for ax, metric in zip(axes[:, 0], metrics, strict=False):
        ax.axvline(0, color="#8c959f", linewidth=1)
        labels = []
        for y, treatment in enumerate(treatments):
            row = by_key.get((metric, treatment))
            labels.append(treatment)
            if row is None or row[6] is None or row[7] is None:
                reason = (row[10] if row else None) or "no result"
                ax.text(0, y, f"  n/a: {reason.split(';')[0]}", va="center", fontsize=8, color=COLORS["unclear"])
                continue
            lift, low, high, p_value = row[6], row[7], row[8], row[9]
            verdict = "unclear" if p_value is None or p_value >= SIGNIFICANT else ("better" if lift > 0 else "worse")
            ax.errorbar([lift * 100], [y], xerr=[[(lift - low) * 100], [(high - lift) * 100]], fmt="o",
                        color=COLORS[verdict], capsize=4, markersize=6)
            p_text = "n/a" if p_value is None or math.isnan(p_value) else f"{p_value:.3g}"
            control_row = by_key.get((metric, experiment.control))
            means = f"  mean {row[5]:.3g} vs {control_row[5]:.3g}" if control_row and row[5] is not None else ""
            ax.annotate(f"{_percent(lift)} [{_percent(low)}, {_percent(high)}]  p={p_text}{means}",
                        (high * 100, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(max(len(labels), 1) - 0.3, -0.7)  # the first treatment on top
        ax.set_title(metric, fontsize=9, loc="left")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+.0f}%"))
        left, right = ax.get_xlim()
        ax.set_xlim(left, right + (right - left) * 0.8)  # room for the labels right of each interval
        ax.grid(axis="x", color="#eaeef2")
    if notes:
        fig.text(0.02, 0.01, "\n".join(notes), fontsize=8, color=COLORS["worse"], va="bottom")
    fig.tight_layout(rect=(0, 0.04 * len(notes), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
