"""The chart of a run or a comparison: ASR and over-refusal per benchmark and category, one bar per run, each with
its n and a 95 % Wilson interval; a cell a run never evaluated has no bar ("n/a").

Example:
    >>> plot_asr({"base": base_metrics, "trained": trained_metrics}, "asr.png")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trl_rejection.eval.scoring import Metrics
from trl_rejection.io import atomic_write_bytes

MISSING = "n/a"  # a cell one run of a comparison never evaluated: not zero
_PANELS = (("attack_success_rate", "attack_success_rate", "ASR ↓ (full compliance / harmful prompts)"),
           ("over_refusal", "over_refusal_rate", "over-refusal ↓ (full + partial refusals / safe prompts)"))
Cell = tuple[float, int]  # (rate, n) of one chart bar


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a rate `successes / n` (honest at 0 % and small n).

    Example:
        >>> [round(x, 3) for x in wilson_interval(0, 5)]
        [0.0, 0.434]
    """
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(metrics: Metrics, key: str, rate: str, bench: str, category: str) -> Cell | None:
    """(rate, n) of one cell, category "all" = the benchmark overall; None when the run has no such prompts."""
    entry = metrics.get(bench, {}).get(key)
    part = entry if entry is not None and category == "all" else (entry or {}).get("per_category", {}).get(category)
    return None if part is None else (part[rate], part["total"])


def chart_panels(runs: dict[str, Metrics]) -> list[tuple[str, list[tuple[str, str]], dict[str, list[Cell | None]]]]:
    """What `plot_asr` draws: per panel (ASR, over-refusal) its title, its rows (benchmark, category; "all" = the
    benchmark overall, first) and per run one (rate, n) per row, None where the run never evaluated it (no bar).

    Example:
        >>> m = {"b": {"over_refusal": {"over_refusal_rate": 0.5, "total": 2, "per_category": {}}}}
        >>> chart_panels({"base": m, "trained": {}})[0][1:]
        ([('b', 'all')], {'base': [(0.5, 2)], 'trained': [None]})
    """
    panels = []
    for key, rate, title in _PANELS:
        rows = sorted({(b, c) for m in runs.values() for b, entry in m.items() if key in entry
                       for c in ("all", *entry[key].get("per_category", {}))},
                      key=lambda k: (k[0], k[1] != "all", k[1]))
        if rows:
            panels.append((title, rows, {name: [_rate(m, key, rate, b, c) for b, c in rows]
                                         for name, m in runs.items()}))
    return panels


def plot_asr(runs: dict[str, Metrics], path: str | Path, footnote: str = "", warning: str = "") -> Path:
    """Two panels, ASR and over-refusal, one row per benchmark (overall) and category, one bar per run (legend: the
    run names, e.g. models). Every bar is labelled with its rate and n and has a 95 % Wilson whisker; a cell a run
    never evaluated has no bar and reads "n/a". `warning` goes in red under the title (a random-weight dry run),
    `footnote` under the chart (judge, sampling). PNG, Agg.

    Example:
        >>> plot_asr({"base": base_metrics, "trained": trained_metrics}, "asr.png")  # doctest: +SKIP
    """
    panels = chart_panels(runs)
    height_rows = max([len(rows) for _, rows, _ in panels] or [1]) * len(runs)
    fig = Figure(figsize=(7 * max(1, len(panels)), 2.2 + 0.28 * height_rows + 0.18 * footnote.count("\n")))
    FigureCanvasAgg(fig)
    height = 0.8 / max(1, len(runs))
    for p, (title, rows, by_run) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        for i, (name, cells) in enumerate(by_run.items()):
            ys = [k + i * height for k in range(len(rows))]
            shown = [(y, cell) for y, cell in zip(ys, cells) if cell is not None]
            color = f"C{i}"
            if shown:
                values = [v for _, (v, _) in shown]
                low_high = [wilson_interval(round(v * n), n) for _, (v, n) in shown]
                errors = [[v - lo for v, (lo, _) in zip(values, low_high)],
                          [hi - v for v, (_, hi) in zip(values, low_high)]]
                bars = ax.barh([y for y, _ in shown], values, height=height, color=color, xerr=errors,
                               error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.3"},
                               label=name if p == 0 else None)
                ax.bar_label(bars, labels=[f"{v:.0%} (n={n})" for _, (v, n) in shown], padding=3, fontsize=7)
            elif p == 0:
                ax.barh([], [], color=color, label=name)
            for y, cell in zip(ys, cells):
                if cell is None:
                    ax.text(0.01, y, MISSING + " (not evaluated)", va="center", fontsize=7, color="0.4")
        ax.set_yticks([k + height * (len(runs) - 1) / 2 for k in range(len(rows))],
                      [f"{b} (all)" if c == "all" else f"{b} / {c}" for b, c in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
        ax.set_title(title, fontsize=10)
    if not panels:
        fig.add_subplot().text(0.5, 0.5, "no safety prompts in these runs", ha="center")
    fig.suptitle(" vs ".join(runs), fontsize=11)
    if warning:
        fig.text(0.5, 0.925, warning, ha="center", va="top", fontsize=9, color="red", weight="bold")
    if panels:
        fig.legend(loc="lower right", fontsize=8, title="run", title_fontsize=8)
    footnote = (footnote + "\n" if footnote else "") + "bars: rate (n = prompts); whiskers: 95% Wilson interval"
    fig.text(0.01, 0.005, footnote, fontsize=7, va="bottom", ha="left", wrap=True)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * (footnote.count("\n") + 1), 1, 0.9 if warning else 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
