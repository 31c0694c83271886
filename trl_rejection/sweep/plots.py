"""The sweep's figure: ASR, over-refusal and utility against the dose, and ASR against over-refusal (the trade-off
to pick a point from), base model marked. `plot_data` is what is drawn, so tests check the numbers exactly.

Example:
    >>> plot_data({"axes": ["n_refusal"], "rows": []})["tradeoff"]
    {'points': [], 'base': None}
"""

from __future__ import annotations

import io
from pathlib import Path
from statistics import fmean
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_write_bytes

PANELS = (("asr", "ASR ↓ (full compliance / harmful prompts)"),
          ("over_refusal", "over-refusal ↓ (full + partial / safe prompts)"), ("utility", "utility ↑ (accuracy)"))


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _mean(row: dict[str, Any], prefix: str) -> float | None:
    values = [v for k, v in row.items() if k.startswith(prefix + "/") and v is not None]
    return fmean(values) if values else None


def plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    """Per panel (asr, over_refusal, utility): one line per benchmark and setting of the other swept axes, x = the
    first swept axis (positions 0, 1, ... with tick labels when it is not a number), and the base value per
    benchmark; `tradeoff`: per point (label, mean over-refusal, mean ASR over the benchmarks that have them), base
    too."""
    axis, others = summary["axes"][0], summary["axes"][1:]
    points = [r for r in summary["rows"] if r["kind"] == "point"]
    base = next((r for r in summary["rows"] if r["kind"] == "base"), None)
    xs = list(dict.fromkeys(r["dose"][axis] for r in points))
    numeric = _numeric(xs)
    position = {repr(x): x if numeric else i for i, x in enumerate(xs)}
    data: dict[str, Any] = {"x_axis": axis, "x_ticks": None if numeric else [str(x) for x in xs]}
    for prefix, _ in PANELS:
        lines: dict[tuple[str, str], list[tuple[Any, float]]] = {}
        for row in points:
            series = ", ".join(f"{k}={row['dose'][k]}" for k in others)
            for key, value in row.items():
                if key.startswith(prefix + "/") and value is not None:
                    lines.setdefault((key.split("/", 1)[1], series), []).append((position[repr(row["dose"][axis])],
                                                                                 value))
        data[prefix] = [{"benchmark": b, "series": s, "x": [x for x, _ in sorted(v)], "y": [y for _, y in sorted(v)]}
                        for (b, s), v in sorted(lines.items())]
        data[prefix + "_base"] = {k.split("/", 1)[1]: v for k, v in (base or {}).items()
                                  if k.startswith(prefix + "/") and v is not None}
    def spot(row: dict[str, Any]) -> dict[str, Any] | None:
        x, y = _mean(row, "over_refusal"), _mean(row, "asr")
        return None if x is None or y is None else {"label": row["label"], "x": x, "y": y}
    data["tradeoff"] = {"points": [s for r in points if (s := spot(r))], "base": spot(base) if base else None}
    return data


def _warning(fig: Figure, summary: dict[str, Any]) -> None:
    if summary.get("dry_run"):
        fig.text(0.5, 0.955, summary["dry_run"], ha="center", va="top", fontsize=9, color="red", weight="bold",
                 wrap=True)


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _tradeoff(ax: Any, tradeoff: dict[str, Any], color: str = "C0", name: str = "") -> None:
    pts = tradeoff["points"]
    ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "o", color=color, label=name or "points")
    spots: dict[tuple[float, float], list[str]] = {}  # points at the same place share one label
    for p in pts:
        spots.setdefault((p["x"], p["y"]), []).append(p["label"])
    for (x, y), labels in spots.items():
        ax.annotate("\n".join(labels), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    ha="right" if x > 0.7 else "left")
    if tradeoff["base"]:
        b = tradeoff["base"]
        ax.plot([b["x"]], [b["y"]], "*", color=color, markersize=14, markeredgecolor="k",
                label=f"{name + ': ' if name else ''}base model")
        ax.annotate("base", (b["x"], b["y"]), textcoords="offset points", xytext=(6 if b["x"] <= 0.7 else -28, -12),
                    fontsize=8, weight="bold")
    ax.set_xlabel("over-refusal ↓ (mean over benchmarks)")
    ax.set_ylabel("ASR ↓ (mean over benchmarks)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("trade-off: pick a point low and to the left", fontsize=10)
    ax.legend(fontsize=7)


def plot_sweep(summary: dict[str, Any], path: str | Path) -> Path:
    """The four panels (three dose curves with the base as dotted lines, and the trade-off) in one PNG."""
    data = plot_data(summary)
    fig = Figure(figsize=(12, 9))
    FigureCanvasAgg(fig)
    for i, (prefix, title) in enumerate(PANELS):
        ax = fig.add_subplot(2, 2, i + 1)
        if not data[prefix] and not data[prefix + "_base"]:
            hint = " (add scienceqa or vizwiz to the\nevaluation's benchmarks)" if prefix == "utility" else ""
            ax.text(0.5, 0.5, f"no {prefix.replace('_', '-')} benchmark evaluated{hint}", ha="center", va="center")
            ax.set_axis_off()
            continue
        colors = {b: f"C{k}" for k, b in enumerate(sorted({ln["benchmark"] for ln in data[prefix]}
                                                         | set(data[prefix + "_base"])))}
        styles = {s: st for s, st in zip(dict.fromkeys(ln["series"] for ln in data[prefix]), ["-", "--", "-.", ":"] * 9)}
        for line in data[prefix]:
            name = line["benchmark"] + (f" ({line['series']})" if line["series"] else "")
            ax.plot(line["x"], line["y"], styles[line["series"]], marker="o", color=colors[line["benchmark"]],
                    label=name)
        for bench, value in data[prefix + "_base"].items():
            ax.axhline(value, color=colors[bench], linestyle=":", linewidth=1, label=f"{bench}: base model")
        if data["x_ticks"]:
            ax.set_xticks(range(len(data["x_ticks"])), data["x_ticks"])
        ax.set_xlabel(data["x_axis"])
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    _tradeoff(fig.add_subplot(2, 2, 4), data["tradeoff"])
    fig.suptitle("Refusal-dose sweep", fontsize=12)
    _warning(fig, summary)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if summary.get("dry_run") else 0.96))
    _save(fig, Path(path))
    return Path(path)


def plot_tradeoffs(summaries: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """Several sweeps' trade-offs in one panel, one colour per sweep."""
    fig = Figure(figsize=(7, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, (name, summary) in enumerate(summaries.items()):
        _tradeoff(ax, plot_data(summary)["tradeoff"], f"C{k}", name)
    warnings = [s["dry_run"] for s in summaries.values() if s.get("dry_run")]
    if warnings:
        _warning(fig, {"dry_run": warnings[0]})
    fig.tight_layout(rect=(0, 0, 1, 0.9 if warnings else 1))
    _save(fig, Path(path))
    return Path(path)
