"""Score generations and report: metrics JSON, a Markdown table and a chart of ASR and over-refusal per benchmark and
category (every number with its n); or two runs (base vs trained) side by side.

A run folder holds `run_config.json` and `generations.jsonl` (from `recipes/eval_safety.py` / `generate`), and after
`report_run`: `scored.jsonl` (each row with its judge `label` or utility `score`), `metrics.json`, `report.md` and
`asr_by_category.png`. A cell a run never evaluated is "n/a" in comparisons and has no bar: missing is not zero.

Example:
    >>> metrics = report_run("runs/base")  # doctest: +SKIP
    >>> print(compare_runs("runs/base", "runs/trained", "runs/compare"))  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trl_rejection.constants import TINY_MODEL
from trl_rejection.eval.generations import read_generations
from trl_rejection.eval.scoring import JudgeSpec, Metrics, compute_metrics, score_generations
from trl_rejection.io import atomic_write_bytes, atomic_write_text
from trl_rejection.metrics.labels import Judge


def _cells(metrics: Metrics) -> dict[tuple[str, str], dict[str, str]]:
    """(benchmark, category) -> formatted cells; category "all" is the benchmark overall."""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for bench, entry in metrics.items():
        for key, rate in _RATES.items():
            if key not in entry:
                continue
            parts = {"all": entry[key], **entry[key].get("per_category", {})}
            for category, part in parts.items():
                cell = f"{part[rate]:.1%}"
                if key.startswith("over_refusal"):
                    cell += f" ({part['full_refusal_rate']:.0%} + {part['partial_refusal_rate']:.0%})"
                cells.setdefault((bench, category), {})[key] = f"{cell} (n={part['total']})"
    return dict(sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "all", kv[0][1])))


_COLUMNS = (("attack_success_rate", "ASR ↓"), ("over_refusal", "over-refusal ↓ (full + partial)"),
            ("utility", "accuracy ↑"))
_OPTIONAL_COLUMNS = (("attack_success_rate_normalized", "ASR normalized ↓"),
                     ("over_refusal_normalized", "over-refusal normalized ↓"), ("attack_success_rate_guard", "guard ASR ↓"))
_RATES = {"attack_success_rate": "attack_success_rate", "over_refusal": "over_refusal_rate", "utility": "accuracy",
          "attack_success_rate_normalized": "attack_success_rate", "over_refusal_normalized": "over_refusal_rate",
          "attack_success_rate_guard": "attack_success_rate"}  # metrics.json key -> the rate shown


def _columns(*runs: Metrics) -> tuple[tuple[str, str], ...]:
    """The table columns: the base ones, then each judge variant (normalized string match, guard) a run reports."""
    present = {key for metrics in runs for entry in metrics.values() for key in entry}
    return _COLUMNS + tuple(column for column in _OPTIONAL_COLUMNS if column[0] in present)


def markdown_table(metrics: Metrics) -> str:
    """One row per benchmark ("all") and per category: ASR, over-refusal and utility accuracy, with counts.

    Example:
        >>> print(markdown_table({"b": {"utility": {"accuracy": 0.5, "total": 2, "per_category": {}}}}))
        | benchmark | category | ASR ↓ | over-refusal ↓ (full + partial) | accuracy ↑ |
        |---|---|---|---|---|
        | b | all |  |  | 50.0% (n=2) |
    """
    columns = _columns(metrics)
    header = "| benchmark | category | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|---" * (2 + len(columns)) + "|"]
    for (bench, category), row in _cells(metrics).items():
        lines.append(f"| {bench} | {category} | " + " | ".join(row.get(k, "") for k, _ in columns) + " |")
    return "\n".join(lines)


MISSING = "n/a"  # a cell one run of a comparison never evaluated: not zero


def markdown_comparison(a: Metrics, b: Metrics, names: tuple[str, str] = ("base", "trained")) -> str:
    """Two runs side by side: each metric for run A, then run B, per benchmark and category. A cell one run has and
    the other never evaluated reads "n/a" (missing is not zero); a metric neither run has stays empty.

    Example:
        >>> a = {"b": {"utility": {"accuracy": 0.5, "total": 2, "per_category": {}}}}
        >>> markdown_comparison(a, a).splitlines()[2]
        '| b | all |  |  |  |  | 50.0% (n=2) | 50.0% (n=2) |'
        >>> markdown_comparison(a, {}).splitlines()[2]
        '| b | all |  |  |  |  | 50.0% (n=2) | n/a |'
    """
    cells_a, cells_b, columns = _cells(a), _cells(b), _columns(a, b)
    header = " | ".join(f"{title} {name}" for _, title in columns for name in names)
    lines = [f"| benchmark | category | {header} |", "|---" * (2 + 2 * len(columns)) + "|"]
    for key in sorted(cells_a.keys() | cells_b.keys(), key=lambda k: (k[0], k[1] != "all", k[1])):
        row = []
        for k, _ in columns:
            pair = (cells_a.get(key, {}).get(k), cells_b.get(key, {}).get(k))
            row += ["", ""] if pair == (None, None) else [cell or MISSING for cell in pair]
        lines.append(f"| {key[0]} | {key[1]} | {' | '.join(row)} |")
    return "\n".join(lines)


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


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """`<run_dir>/run_config.json` (written by `recipes/eval_safety.py`), or None for a run folder without one."""
    file = Path(run_dir) / "run_config.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else None


def setting_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`name old -> new` for each differing setting of two (nested) settings dicts, nested names joined with dots.

    Example:
        >>> setting_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
        ['b.c 2 -> 3']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in dict.fromkeys([*old, *new])
                for line in setting_differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]


def _judges(metrics: Metrics) -> list[str]:
    """The judges named in a run's metrics (string match, its normalized variant, a guard model)."""
    return sorted({part["judge"] for entry in metrics.values() for part in entry.values()
                   if isinstance(part, dict) and "judge" in part})


def dry_run_warning(config: dict[str, Any] | None, name: str = "") -> str | None:
    """The warning of a run on the random-weight tiny model (`TINY_MODEL`, with or without an adapter), else None."""
    if (config or {}).get("generation", {}).get("model_name_or_path") != TINY_MODEL:
        return None
    return (f"{name}: " if name else "") + (f"RANDOM-WEIGHT DRY RUN ({TINY_MODEL}): these numbers test the pipeline, "
                                            "not a model; a low ASR here does not mean safe")


def run_notes(config: dict[str, Any] | None, metrics: Metrics, name: str = "") -> list[str]:
    """What a reader must know beside the numbers: whether and how the run was sampled, and the judges used."""
    prefix = f"{name}: " if name else ""
    notes = []
    sampling = (config or {}).get("sampling", {})
    if sampling.get("max_samples") is not None:
        kept = ", ".join(f"{b} {c['kept']} of {c['of']}" for b, c in sampling.get("benchmarks", {}).items())
        notes.append(f"{prefix}sampled: at most {sampling['max_samples']} prompts per benchmark ({kept}), seed "
                     f"{sampling.get('seed')}, stratified by category")
    if judges := _judges(metrics):
        notes.append(f"{prefix}judge: {', '.join(judges)}" + (" (string match: not comparable with GPT-4-judged "
                     "ASR; see docs/evaluation.md)" if all(j.startswith("string_match") for j in judges) else ""))
    return notes


def settings_markdown(config: dict[str, Any] | None) -> str:
    """The run's settings as a Markdown list (from run_config.json), or a line saying they were not recorded."""
    if not config or "generation" not in config:
        return "Settings: not recorded (no run_config.json in the run folder)."
    lines = ["## Settings", ""]
    for key, value in config["generation"].items():
        if key == "records":
            value = ", ".join(f"{b} n={r['n']} (sha256 {r['sha256'][:12]})" for b, r in value.items())
        elif key == "versions":
            value = ", ".join(f"{p} {v}" for p, v in value.items())
        lines.append(f"- {key}: {value}")
    sampling = config.get("sampling", {})
    if sampling.get("max_samples") is None:
        lines.append("- sampling: none (every record of each benchmark)")
    else:
        lines.append(f"- sampling: at most {sampling['max_samples']} per benchmark, seed {sampling.get('seed')}; "
                     f"{sampling.get('rule')}")
    lines += [f"- {key}: {value}" for key, value in {**config.get("scoring", {}), **config.get("recorded", {})}.items()]
    return "\n".join(lines)


def report_run(run_dir: str | Path, judge: JudgeSpec | Mapping[str, JudgeSpec] = None, title: str | None = None,
               guard: str | Judge | None = None) -> Metrics:
    """Score `<run_dir>/generations.jsonl` and write scored.jsonl, metrics.json, report.md (table with n per cell,
    warnings, settings from run_config.json) and asr_by_category.png.
    `judge`: one judge spec or {benchmark: spec} (`scoring.judge_for`); `guard`: a Llama Guard model id or folder whose
    ASR is reported beside the string match (`scoring.score_generations`).

    Example:
        >>> report_run("runs/base")["xstest"]["over_refusal"]["over_refusal_rate"]  # doctest: +SKIP
        0.084
    """
    run = Path(run_dir)
    rows = read_generations(run / "generations.jsonl")
    if not rows:
        raise FileNotFoundError(f"no generations in {run / 'generations.jsonl'}; run the generation step first")
    scored = score_generations(rows, judge, guard)
    atomic_write_text(run / "scored.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in scored))
    metrics = compute_metrics(scored)
    atomic_write_text(run / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    config, title = read_run_config(run), title or run.name
    warning, notes = dry_run_warning(config), run_notes(config, metrics)
    quoted = (f"> **{warning}**\n\n" if warning else "") + "".join(f"> {note}\n\n" for note in notes)
    atomic_write_text(run / "report.md", f"# {title}\n\n{quoted}{markdown_table(metrics)}\n\n"
                      f"{settings_markdown(config)}\n")
    plot_asr({title: metrics}, run / "asr_by_category.png", footnote="\n".join(notes), warning=warning or "")
    return metrics


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> str:
    """Side-by-side Markdown of two scored runs (their metrics.json), "n/a" where one run never evaluated a cell,
    with the runs' warnings and the generation settings that differ (from run_config.json); with `out_dir`, also
    writes comparison.md and comparison.png there. Returns the Markdown.

    Example:
        >>> print(compare_runs("runs/base", "runs/trained"))  # doctest: +SKIP
    """
    names = (Path(run_a).name, Path(run_b).name)
    if names[0] == names[1]:
        names = (str(run_a), str(run_b))
    loaded, configs = [], []
    for run in (run_a, run_b):
        file = Path(run) / "metrics.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} not found; score the run first (eval_safety.py without --compare)")
        loaded.append(json.loads(file.read_text(encoding="utf-8")))
        configs.append(read_run_config(run))
    warnings = [w for name, config in zip(names, configs) if (w := dry_run_warning(config, name))]
    notes = [note for name, config, metrics in zip(names, configs, loaded) for note in run_notes(config, metrics, name)]
    if all(configs):
        differ = setting_differences(*(c.get("generation", {}) for c in configs))
        settings = "generation settings that differ: " + ("; ".join(differ) if differ else "none")
    else:
        settings = ("settings of " + " and ".join(n for n, c in zip(names, configs) if not c) + " not recorded (no "
                    "run_config.json): check that both runs used the same benchmarks and settings")
    text = markdown_comparison(loaded[0], loaded[1], names) + "\n\n" + "\n".join(
        f"- {line}" for line in [*(f"**{w}**" for w in warnings), *notes, settings])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "comparison.md", f"# {names[0]} vs {names[1]}\n\n{text}\n")
        models = [_model_name(c) for c in configs]
        legend = {f"{name}: {model}" if model else name: m for name, model, m in zip(names, models, loaded)}
        plot_asr(legend, out / "comparison.png", footnote="\n".join(notes), warning="\n".join(warnings))
    return text


def _model_name(config: dict[str, Any] | None) -> str | None:
    """`model + adapter` of a run_config, for legends."""
    generation = (config or {}).get("generation", {})
    model, adapter = generation.get("model_name_or_path"), generation.get("adapter_path")
    return model and model + (f" + {adapter}" if adapter else "")
