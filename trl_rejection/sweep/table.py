"""Collect a sweep's finished runs into one table (Markdown + CSV) and `sweep.json`; compare two sweeps.

Per run (the base model first, marked `base`): the doses, per benchmark ASR, over-refusal (full + partial) and
utility with their n, the final logged `loss_refusal` / `loss_normal` / `loss` (trainer_state.json's log history),
input tokens seen and optimizer steps. Rates are fractions in the CSV and sweep.json, percentages in Markdown.

Example:
    >>> summary = json.loads(Path("outputs/sweep_tiny/sweep.json").read_text())  # doctest: +SKIP
    >>> [row["label"] for row in summary["rows"]]  # doctest: +SKIP
    ['base model', 'n_refusal=0', 'n_refusal=10', 'n_refusal=20']
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..eval.report import dry_run_warning
from ..io import atomic_write_text

DOSE_COLUMNS = ("kind", "hash", "label", "n_refusal", "n_normal", "refusal_fraction", "refusal_label_tokens",
                "mask_refusal_eos", "seed")
TRAIN_COLUMNS = ("loss_refusal", "loss_normal", "loss", "train_loss", "tokens_seen", "steps")
METRICS = (  # metrics.json key, rate key, column prefix
    ("attack_success_rate", "attack_success_rate", "asr"), ("over_refusal", "over_refusal_rate", "over_refusal"),
    ("over_refusal", "full_refusal_rate", "over_refusal_full"),
    ("over_refusal", "partial_refusal_rate", "over_refusal_partial"), ("utility", "accuracy", "utility"))


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def training_summary(state: dict[str, Any] | None) -> dict[str, Any]:
    """From a trainer_state.json: the last logged split losses and loss, `train_loss` (the mean over the run), input
    tokens seen and optimizer steps (None where absent)."""
    history = (state or {}).get("log_history", [])
    last = {key: next((h[key] for h in reversed(history) if key in h), None)
            for key in ("loss_refusal", "loss_normal", "loss", "train_loss")}
    return {**last, "tokens_seen": (state or {}).get("num_input_tokens_seen") or None,
            "steps": (state or {}).get("global_step")}


def run_row(folder: Path) -> dict[str, Any]:
    """One table row from a finished run folder (point.json, eval/metrics.json, train/trainer_state.json)."""
    info = _read(folder / "point.json")
    row: dict[str, Any] = {key: info.get(key) for key in DOSE_COLUMNS}
    if info["kind"] == "point":
        total = info["n_refusal"] + info["n_normal"]
        row["refusal_fraction"] = info["n_refusal"] / total
        row["refusal_label_tokens"] = "all" if info["refusal_label_tokens"] is None else info["refusal_label_tokens"]
        row.update(training_summary(_read(folder / "train" / "trainer_state.json")))
    for bench, entry in sorted((_read(folder / "eval" / "metrics.json") or {}).items()):
        for key, rate, prefix in METRICS:
            if key in entry:
                row[f"{prefix}/{bench}"] = entry[key][rate]
                row[f"n/{key}/{bench}"] = entry[key]["total"]
    row["dose"] = info.get("dose", {})
    return row


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """Table columns in a fixed order: doses, metrics per benchmark (with their n), training."""
    present = {key for row in rows for key in row}
    benches = sorted({key.split("/", 1)[1] for key in present if key.startswith(("asr/", "over_refusal/",
                                                                                  "utility/"))})
    metric = [c for bench in benches for key, _, prefix in METRICS
              for c in (f"{prefix}/{bench}", f"n/{key}/{bench}") if c in present]
    return [*DOSE_COLUMNS, *dict.fromkeys(metric), *TRAIN_COLUMNS]


def collect(base_dir: Path, point_dirs: list[Path], axes: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """The sweep.json content: the base row (if evaluated) and every finished point's row, in grid order."""
    rows = [run_row(d) for d in [base_dir, *point_dirs] if (d / "done.json").is_file()]
    eval_config = _read(base_dir / "eval" / "run_config.json") or next(
        (_read(d / "eval" / "run_config.json") for d in point_dirs if (d / "done.json").is_file()), None)
    warning = dry_run_warning(eval_config)
    return {"format": 1, "axes": axes, "columns": columns(rows), "rows": rows, "dry_run": warning,
            "missing": [d.name for d in point_dirs if not (d / "done.json").is_file()], "config": config}


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if column.startswith(("asr/", "over_refusal", "utility/")) or column == "refusal_fraction":
        return f"{value:.1%}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown(summary: dict[str, Any]) -> str:
    """The table as Markdown: one row per run, rates as percentages, each metric with its n in the header."""
    rows, cols = summary["rows"], [c for c in summary["columns"] if not c.startswith("n/")]
    def title(col: str) -> str:
        key = next((k for k, _, prefix in METRICS if col.startswith(prefix + "/")), None)
        ns = {row.get(f"n/{key}/{col.split('/', 1)[1]}") for row in rows} - {None} if key else set()
        return col + (f" (n={'/'.join(str(n) for n in sorted(ns))})" if ns else "")
    lines = ["| " + " | ".join(title(c) for c in cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(_cell(row, c) for c in cols) + " |" for row in rows]
    notes = [f"**{summary['dry_run']}**"] if summary.get("dry_run") else []
    if summary.get("missing"):
        notes.append(f"not finished (not in the table): {', '.join(summary['missing'])}")
    notes.append("asr: full compliance / harmful prompts; over_refusal = full + partial refusals / safe prompts; "
                 "losses: the last logged value (train_loss: the run's mean); tokens_seen: non-padding input tokens")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def csv_text(summary: dict[str, Any]) -> str:
    """The table as CSV, every column (n included), rates as fractions."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=summary["columns"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary["rows"])
    return buffer.getvalue()


def write_outputs(summary: dict[str, Any], out: Path) -> None:
    """sweep.md, sweep.csv, sweep.json and sweep.png in `out`, each written whole."""
    from .plots import plot_sweep

    atomic_write_text(out / "sweep.md", "# Refusal-dose sweep\n\n" + markdown(summary))
    atomic_write_text(out / "sweep.csv", csv_text(summary))
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    plot_sweep(summary, out / "sweep.png")


def compare_sweeps(sweep_a: str | Path, sweep_b: str | Path, out: str | Path) -> str:
    """Two sweeps' tables stacked into one (a `sweep` column first) in `out/comparison.md` and `.csv`, and their
    trade-offs in one figure (`comparison.png`). Returns the Markdown."""
    from .plots import plot_tradeoffs

    summaries = {}
    for folder in (sweep_a, sweep_b):
        file = Path(folder) / "sweep.json"
        if not file.is_file():
            raise UserError(f"{file} not found. Fix: give folders of finished sweeps (recipes/sweep.py)")
        summaries[Path(folder).name if Path(sweep_a).name != Path(sweep_b).name else str(folder)] = _read(file)
    rows = [{"sweep": name, **row} for name, s in summaries.items() for row in s["rows"]]
    merged = {"columns": ["sweep", *columns(rows)], "rows": rows,
              "dry_run": "; ".join(dict.fromkeys(s["dry_run"] for s in summaries.values() if s.get("dry_run"))) or None,
              "missing": [m for s in summaries.values() for m in s.get("missing", [])]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(merged)
    atomic_write_text(out / "comparison.md", f"# {' vs '.join(summaries)}\n\n{text}")
    atomic_write_text(out / "comparison.csv", csv_text(merged))
    plot_tradeoffs(summaries, out / "comparison.png")
    return text
