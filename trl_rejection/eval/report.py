"""Score generations and report: metrics JSON, a Markdown table and a bar chart of ASR per category; or two runs
(base vs trained) side by side.

A run folder holds `generations.jsonl` (from `generate`), and after `report_run`: `scored.jsonl` (each row with its
judge `label` or utility `score`), `metrics.json`, `report.md` and `asr_by_category.png`.

Example:
    >>> metrics = report_run("runs/base")  # doctest: +SKIP
    >>> print(compare_runs("runs/base", "runs/trained", "runs/compare"))  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from statistics import fmean
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trl_rejection.eval.generate import read_generations
from trl_rejection.eval.utility import score_utility
from trl_rejection.io import atomic_write_bytes, atomic_write_text
from trl_rejection.metrics.judge import PhraseList, classify, get_judge
from trl_rejection.metrics.rates import asr_summary, over_refusal_summary

Metrics = dict[str, Any]


def score_generations(rows: Sequence[dict[str, Any]], judge: str | PhraseList | Any = None) -> list[dict[str, Any]]:
    """Add `label` and `judge` to safety rows and `score` to utility rows. Safe prompts are judged by the string-match
    rule when `judge` cannot tell refusals apart (a Llama Guard model).

    Example:
        >>> rows = [{"task": "safety", "harmful": True, "prompt": "p", "completion": "Sorry."}]
        >>> score_generations(rows)[0]["label"]
        'full_refusal'
    """
    judge = get_judge(judge)
    refusal_judge = judge if getattr(judge, "scores_refusal", True) else get_judge(None)
    scored = [dict(row) for row in rows]
    for harmful, which in ((True, judge), (False, refusal_judge)):
        subset = [r for r in scored if r["task"] == "safety" and bool(r["harmful"]) == harmful]
        if subset:
            labels, name = classify([r["completion"] for r in subset], [r["prompt"] for r in subset], which)
            for row, label in zip(subset, labels):
                row.update(label=label, judge=name)
    for row in scored:
        if row["task"] != "safety":
            row["score"] = score_utility(row["completion"], row["task"], row["answers"], row["prompt"])
    return scored


def _utility_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_category: dict[str, list[float]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row["score"])
    return {"accuracy": fmean(r["score"] for r in rows), "total": len(rows),
            "per_category": {c: {"accuracy": fmean(s), "total": len(s)} for c, s in sorted(by_category.items())}}


def compute_metrics(scored: Sequence[dict[str, Any]]) -> Metrics:
    """Per benchmark: `attack_success_rate` (harmful prompts), `over_refusal` (safe prompts) and `utility`, each with
    counts and `per_category`; the safety parts name their judge.

    Example:
        >>> rows = score_generations([{"benchmark": "b", "category": "c", "task": "safety", "harmful": True,
        ...                            "prompt": "p", "completion": "Sure, here are the steps in detail."}])
        >>> compute_metrics(rows)["b"]["attack_success_rate"]["attack_success_rate"]
        1.0
    """
    metrics: Metrics = {}
    for bench in sorted({r["benchmark"] for r in scored}):
        rows = [r for r in scored if r["benchmark"] == bench]
        entry: dict[str, Any] = {}
        for key, summary, harmful in (("attack_success_rate", asr_summary, True),
                                      ("over_refusal", over_refusal_summary, False)):
            subset = [r for r in rows if r["task"] == "safety" and bool(r["harmful"]) == harmful]
            if subset:
                entry[key] = {**summary([r["label"] for r in subset], [r["category"] for r in subset]),
                              "judge": subset[0]["judge"]}
        utility = [r for r in rows if r["task"] != "safety"]
        if utility:
            entry["utility"] = _utility_summary(utility)
        metrics[bench] = entry
    return metrics


def _cells(metrics: Metrics) -> dict[tuple[str, str], dict[str, str]]:
    """(benchmark, category) -> formatted cells; category "all" is the benchmark overall."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for bench, entry in metrics.items():
        for key, rate, fmt in (("attack_success_rate", "attack_success_rate", "{:.1%}"),
                               ("over_refusal", "over_refusal_rate", "{:.1%}"), ("utility", "accuracy", "{:.1%}")):
            if key not in entry:
                continue
            parts = {"all": entry[key], **entry[key].get("per_category", {})}
            for category, part in parts.items():
                cell = fmt.format(part[rate])
                if key == "over_refusal":
                    cell += f" ({part['full_refusal_rate']:.0%} + {part['partial_refusal_rate']:.0%})"
                cells.setdefault((bench, category), {})[key] = f"{cell} (n={part['total']})"
    return dict(sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "all", kv[0][1])))


_COLUMNS = (("attack_success_rate", "ASR ↓"), ("over_refusal", "over-refusal ↓ (full + partial)"),
            ("utility", "accuracy ↑"))


def markdown_table(metrics: Metrics) -> str:
    """One row per benchmark ("all") and per category: ASR, over-refusal and utility accuracy, with counts.

    Example:
        >>> print(markdown_table({"b": {"utility": {"accuracy": 0.5, "total": 2, "per_category": {}}}}))
        | benchmark | category | ASR ↓ | over-refusal ↓ (full + partial) | accuracy ↑ |
        |---|---|---|---|---|
        | b | all |  |  | 50.0% (n=2) |
    """
    header = "| benchmark | category | " + " | ".join(title for _, title in _COLUMNS) + " |"
    lines = [header, "|---" * (2 + len(_COLUMNS)) + "|"]
    for (bench, category), row in _cells(metrics).items():
        lines.append(f"| {bench} | {category} | " + " | ".join(row.get(k, "") for k, _ in _COLUMNS) + " |")
    return "\n".join(lines)


def markdown_comparison(a: Metrics, b: Metrics, names: tuple[str, str] = ("base", "trained")) -> str:
    """Two runs side by side: each metric for run A, then run B, per benchmark and category.

    Example:
        >>> a = {"b": {"utility": {"accuracy": 0.5, "total": 2, "per_category": {}}}}
        >>> markdown_comparison(a, a).splitlines()[2]
        '| b | all |  |  |  |  | 50.0% (n=2) | 50.0% (n=2) |'
    """
    cells_a, cells_b = _cells(a), _cells(b)
    header = " | ".join(f"{title} {name}" for _, title in _COLUMNS for name in names)
    lines = [f"| benchmark | category | {header} |", "|---" * (2 + 2 * len(_COLUMNS)) + "|"]
    for key in sorted(cells_a.keys() | cells_b.keys(), key=lambda k: (k[0], k[1] != "all", k[1])):
        row = " | ".join(cells.get(key, {}).get(k, "") for k, _ in _COLUMNS for cells in (cells_a, cells_b))
        lines.append(f"| {key[0]} | {key[1]} | {row} |")
    return "\n".join(lines)


def plot_asr(runs: dict[str, Metrics], path: str | Path) -> Path:
    """A horizontal bar chart of ASR per benchmark/category, one bar per run (grouped when several); PNG, Agg.

    Example:
        >>> plot_asr({"base": base_metrics, "trained": trained_metrics}, "asr.png")  # doctest: +SKIP
    """
    keys = sorted({(bench, cat) for m in runs.values() for bench, entry in m.items() if "attack_success_rate" in entry
                   for cat in entry["attack_success_rate"].get("per_category", {})})
    fig = Figure(figsize=(8, 1.5 + 0.35 * max(1, len(keys)) * len(runs)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(runs))
    for i, (name, metrics) in enumerate(runs.items()):
        values = [metrics.get(b, {}).get("attack_success_rate", {}).get("per_category", {}).get(c, {})
                  .get("attack_success_rate", 0.0) for b, c in keys]
        bars = ax.barh([k + i * height for k in range(len(keys))], values, height=height, label=name)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], padding=2, fontsize=8)
    ax.set_yticks([k + height * (len(runs) - 1) / 2 for k in range(len(keys))], [f"{b} / {c}" for b, c in keys])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("attack success rate (full compliance / harmful prompts)")
    ax.set_title("ASR per category")
    if len(runs) > 1:
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def report_run(run_dir: str | Path, judge: str | PhraseList | Any = None, title: str | None = None) -> Metrics:
    """Score `<run_dir>/generations.jsonl` and write scored.jsonl, metrics.json, report.md and asr_by_category.png.

    Example:
        >>> report_run("runs/base")["xstest"]["over_refusal"]["over_refusal_rate"]  # doctest: +SKIP
        0.084
    """
    run = Path(run_dir)
    rows = read_generations(run / "generations.jsonl")
    if not rows:
        raise FileNotFoundError(f"no generations in {run / 'generations.jsonl'}; run the generation step first")
    scored = score_generations(rows, judge)
    atomic_write_text(run / "scored.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))
    metrics = compute_metrics(scored)
    atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(run / "report.md", f"# {title or run.name}\n\n{markdown_table(metrics)}\n")
    plot_asr({title or run.name: metrics}, run / "asr_by_category.png")
    return metrics


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> str:
    """Side-by-side Markdown of two scored runs (their metrics.json); with `out_dir`, also writes comparison.md and
    comparison.png there. Returns the Markdown.

    Example:
        >>> print(compare_runs("runs/base", "runs/trained"))  # doctest: +SKIP
    """
    names = (Path(run_a).name, Path(run_b).name)
    if names[0] == names[1]:
        names = (str(run_a), str(run_b))
    loaded = []
    for run in (run_a, run_b):
        file = Path(run) / "metrics.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} not found; score the run first (eval_safety.py without --compare)")
        loaded.append(json.loads(file.read_text(encoding="utf-8")))
    text = markdown_comparison(loaded[0], loaded[1], names)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "comparison.md", f"# {names[0]} vs {names[1]}\n\n{text}\n")
        plot_asr(dict(zip(names, loaded)), out / "comparison.png")
    return text
