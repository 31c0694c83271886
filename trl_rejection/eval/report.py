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

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trl_rejection.constants import TINY_MODEL
from trl_rejection.eval.chart import MISSING, plot_asr
from trl_rejection.eval.generations import read_generations
from trl_rejection.eval.run_config import read_run_config, setting_differences
from trl_rejection.eval.scoring import JudgeSpec, Metrics, compute_metrics, score_generations
from trl_rejection.io import atomic_write_text
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
